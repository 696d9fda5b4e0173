"""vidrank tune-fusion: the search, its objectives, the profile file it edits and the CLI."""

from __future__ import annotations

import json
import shutil
import threading
import tomllib
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from model.cli import app
from model.core.fusion import FusionSpec, ProfileStore
from model.core.registry import Registry
from model.core.tasks import TRUTH_COLUMNS
from model.simulator.world import SIM_FILES, SimConfig, simulate, write_simulation
from model.training.analysis.fusion_search import (
    CLICK_ONLY,
    Floor,
    Lists,
    Objective,
    search,
    space_params,
    split_users,
    suggest_spec,
)
from model.training.analysis.profiles import load_records, write_profile
from model.training.data import load_impressions
from model.training.evaluate import DEFAULT_FUSION, PRODUCT_FUSION

REPO = Path(__file__).resolve().parents[3]
DEFAULT = FusionSpec.from_dict(DEFAULT_FUSION)
PRODUCT = FusionSpec.from_dict(PRODUCT_FUSION)  # the default until README section 6


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """20k impressions of 200 users (100 each): long per-user lists, with truth columns."""
    out = tmp_path_factory.mktemp("world")
    write_simulation(simulate(SimConfig(n_users=200, n_videos=1000, n_impressions=20_000)), out)
    return load_impressions(out)


def parts_of(
    frame: pd.DataFrame, preds: dict[str, np.ndarray], objective: Objective
) -> dict[str, Lists]:
    mask = split_users(frame["user_id"].to_numpy(), seed=0)
    return {
        part: Lists.of(frame[m], {t: p[m] for t, p in preds.items()}, objective)
        for part, m in (("search", mask), ("report", ~mask))
    }


def test_users_are_split_by_user_and_seed(small_world: pd.DataFrame) -> None:
    users = small_world["user_id"].to_numpy()
    mask = split_users(users, seed=0)
    assert not set(users[mask]) & set(users[~mask])  # no user on both sides
    assert abs(len(set(users[mask])) - len(set(users)) / 2) <= 1
    np.testing.assert_array_equal(mask, split_users(users, seed=0))
    assert not np.array_equal(mask, split_users(users, seed=1))


def test_search_finds_a_better_profile_than_the_default_on_unseen_users(
    small_world: pd.DataFrame,
) -> None:
    # With the truth as predictions, the utility (a weighted sum of the true values) is
    # reachable by a weighted sum, which a weighted product with log1p is not: started from the
    # product (the default until README section 6), the search must find that difference, and
    # it must hold on users it never saw.
    truth = {t: small_world[c].to_numpy() for t, c in TRUTH_COLUMNS.items()}
    objective = Objective.for_frame(small_world)
    assert objective.kind == "truth"
    parts = parts_of(small_world, truth, objective)
    found = search(parts["search"], PRODUCT, trials=40, seed=0)
    assert found.default_enqueued and found.trials == 40
    assert found.value == pytest.approx(parts["search"].ndcg(found.spec))
    assert found.value >= parts["search"].ndcg(PRODUCT)  # by construction: trial 0 is it
    assert parts["report"].ndcg(found.spec) >= parts["report"].ndcg(PRODUCT) + 0.01
    assert parts["report"].ndcg(found.spec) > parts["report"].ndcg(CLICK_ONLY)
    again = search(parts["search"], PRODUCT, trials=40, seed=0)
    assert again.spec.to_dict() == found.spec.to_dict()  # a seeded search is reproducible


def test_logged_objective_and_floor_on_logs_without_truth(small_world: pd.DataFrame) -> None:
    logs = small_world.drop(columns=list(TRUTH_COLUMNS.values()))
    with pytest.raises(ValueError, match="truth"):
        Objective.for_frame(logs, "truth")
    objective = Objective.for_frame(logs, floor=Floor("click", 0.95))
    assert objective.kind == "logged" and "logged engagement" in objective.describe()
    rng = np.random.default_rng(0)  # a noisy model: the truth plus noise
    preds = {
        t: small_world[c].to_numpy() * rng.lognormal(0.0, 0.5, len(logs))
        for t, c in TRUTH_COLUMNS.items()
    }
    parts = parts_of(logs, preds, objective)
    found = search(parts["search"], DEFAULT, trials=30, seed=0, floor=objective.floor)
    search_part = parts["search"]
    ratio = search_part.top_mean(found.spec, "click") / search_part.top_mean(CLICK_ONLY, "click")
    assert ratio >= 0.95  # the floor holds for the chosen profile
    assert 1 <= found.feasible_trials <= found.trials
    assert np.isfinite(found.value) and 0.0 < found.value <= 1.0
    # One trial (a likes-first profile) and a click floor it misses: nothing met it, an error.
    likes_first = FusionSpec.from_dict(
        {"method": "weighted_sum", "weights": {"click": 1.0, "watch_time": 1e-3, "like": 1e3}}
    )
    clicks = search_part.top_mean(likes_first, "click") / search_part.top_mean(CLICK_ONLY, "click")
    assert clicks < 0.95
    with pytest.raises(RuntimeError, match="floor"):
        search(search_part, likes_first, trials=1, seed=0, floor=Floor("click", 0.95))


def test_space_params_express_specs_up_to_a_common_scale() -> None:
    utility = space_params(DEFAULT)  # the default fusion is the search's first trial
    assert utility is not None
    assert suggest_spec(optuna.trial.FixedTrial(utility)).to_dict() == DEFAULT.to_dict()
    params = space_params(PRODUCT)
    assert params is not None
    assert suggest_spec(optuna.trial.FixedTrial(params)).to_dict() == PRODUCT.to_dict()
    watch = {"weight": 1.2, "transform": "log1p"}
    doubled = FusionSpec.from_dict(
        {"method": "weighted_product", "weights": {"click": 2.0, "watch_time": watch, "like": 0.8}}
    )
    assert space_params(doubled) == params
    rank = FusionSpec.from_dict(
        {"method": "rank_sum", "weights": {"click": 1, "watch_time": 1, "like": 0.5}, "beta": 3}
    )
    assert space_params(rank) == {"method": "rank_sum", "watch_time": 1.0, "like": 0.5, "beta": 3}
    outside = [
        {"method": "weighted_sum", "weights": {"click": 1.0}},  # watch_time and like absent
        {"method": "weighted_sum", "weights": {"click": 1, "watch_time": 1, "like": 1e6}},
        {
            "method": "weighted_sum",
            "weights": {"click": 1, "watch_time": 1, "like": {"weight": 1, "transform": "log1p"}},
        },
    ]
    assert all(space_params(FusionSpec.from_dict(d)) is None for d in outside)


# -- the profile file ----------------------------------------------------------------------------


def shipped_profiles(tmp_path: Path) -> Path:
    path = tmp_path / "profiles.toml"
    shutil.copy(REPO / "docker" / "fusion_profiles.toml", path)
    return path


def test_write_profile_keeps_the_file_and_replaces_it_atomically(tmp_path: Path) -> None:
    path = shipped_profiles(tmp_path)
    before = path.read_text()
    with open(path, encoding="utf-8") as old:  # a reader that opened the file before the write
        write_profile(path, "tuned", CLICK_ONLY, {"value": 0.5, "objective": {"k": 10}})
        assert old.read() == before  # replaced by rename, never rewritten in place
    assert [p.name for p in tmp_path.iterdir() if p.name != ".profiles.toml.lock"] == [path.name]
    store = ProfileStore(path)
    assert store.names() == ["utility", "balanced", "watch_time", "rank_blend", "tuned"]
    assert store.default_name == "utility" and store.last_error is None
    assert store.get("tuned").to_dict() == {**CLICK_ONLY.to_dict(), "name": "tuned"}
    text = path.read_text()
    assert text.startswith(before.split("\n")[0])  # comments and layout are kept
    assert "# Multiplicative fusion" in text
    assert tomllib.loads(text)["tuning"]["tuned"] == {"value": 0.5, "objective": {"k": 10}}
    write_profile(path, "tuned", PRODUCT)  # replaced, and its stale record goes with it
    data = tomllib.loads(path.read_text())
    assert data["profiles"]["tuned"]["method"] == "weighted_product" and "tuning" not in data


def test_write_profile_refuses_a_broken_file_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text("[profiles.x\nmethod = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        write_profile(path, "tuned", CLICK_ONLY)
    assert path.read_text() == "[profiles.x\nmethod = "


def test_concurrent_writers_lose_no_profile(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    errors: list[BaseException] = []

    def writer(prefix: str) -> None:
        try:
            for i in range(5):
                write_profile(path, f"{prefix}{i}", CLICK_ONLY, {"n": i})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(ProfileStore(path).names()) == sorted(f"{p}{i}" for p in "abc" for i in range(5))


# -- the command ----------------------------------------------------------------------------------


def without_truth(tmp_path: Path) -> Path:
    """The tiny world's logs as real logs would come: no truth columns."""
    out = tmp_path / "logs"
    write_simulation(simulate(SimConfig(n_impressions=20_000, seed=0)), out)
    log = out / SIM_FILES["log"]
    table = pq.read_table(log)
    pq.write_table(table.drop([c for c in table.column_names if c.startswith("true_")]), log)
    return out


def test_cli_tunes_writes_the_profile_and_the_record_and_reports(
    registry_copy: Path, version: str, tmp_path: Path
) -> None:
    profiles = shipped_profiles(tmp_path)
    args = ["tune-fusion", version, "--registry", str(registry_copy), "--profiles", str(profiles)]
    done = CliRunner().invoke(app, [*args, "--simulate", "20000", "--seed", "0", "--trials", "12"])
    assert done.exit_code == 0, done.output
    name = f"tuned_{version}"
    assert "| tuned |" in done.output and "report part" in done.output
    store = ProfileStore(profiles)
    assert store.names() == ["utility", "balanced", "watch_time", "rank_blend", name]
    record = tomllib.loads(profiles.read_text())["tuning"][name]
    assert record["objective"]["kind"] == "truth" and record["trials"] == 12
    assert record["data"]["source"] == "simulated:20000 (seed 0)"
    assert record["data"]["version_trained_on"] == "simulated:20000"
    assert record["default_was_first_trial"]
    results = record["results"]
    assert set(results) == {"tuned", "default", "click_only"}
    assert record["value"] == results["tuned"]["search"] >= results["default"]["search"]
    assert load_records(Registry(registry_copy), version)[name] == record
    report = (registry_copy / "reports" / version / "report.md").read_text()
    assert f"### Tuned profile `{name}`" in report
    assert (registry_copy / "reports" / version / f"fusion-{name}.png").is_file()

    # Real logs (no truth): the logged-engagement objective, with a click floor.
    logs = without_truth(tmp_path)
    extra = ["--data", str(logs), "--profile", "logged", "--floor", "click=0.9", "--trials", "8"]
    done = CliRunner().invoke(app, [*args, *extra])
    assert done.exit_code == 0, done.output
    record = tomllib.loads(profiles.read_text())["tuning"]["logged"]
    assert record["objective"]["kind"] == "logged"
    assert record["objective"]["floor"] == {"task": "click", "fraction": 0.9}
    assert record["floor_ratio"]["tuned"]["search"] >= 0.9
    assert ProfileStore(profiles).names()[-2:] == [name, "logged"]  # the first one is kept
    saved = json.loads((registry_copy / "tuning" / version / "logged.json").read_text())
    assert saved["objective"]["kind"] == "logged"
    done = CliRunner().invoke(app, [*args, "--data", str(logs), "--objective", "truth"])
    assert done.exit_code == 1 and "--objective truth needs simulated data" in done.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--simulate", "1000", "--data", "x"], "exactly one of"),
        (["--simulate", "1000", "--floor", "clik=0.9"], "unknown task"),
        (["--simulate", "1000", "--floor", "click"], "task=fraction"),
        (["--simulate", "1000", "--objective", "best"], "--objective"),
        (["--simulate", "1000", "--profile", "a b"], "--profile"),
        (["--simulate", "1000", "--trials", "0"], "--trials"),
    ],
)
def test_cli_rejects_bad_options_before_reading_data(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    args = ["tune-fusion", "v1", "--registry", str(tmp_path), "--profiles", str(tmp_path / "p")]
    done = CliRunner().invoke(app, [*args, *extra])
    assert done.exit_code == 2 and message in done.output
    assert not (tmp_path / "p").exists()


def test_cli_names_an_unknown_version(tmp_path: Path) -> None:
    args = ["tune-fusion", "v-none", "--registry", str(tmp_path), "--simulate", "1000"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 1 and "v-none" in done.output

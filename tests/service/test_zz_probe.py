import numpy as np
from model.registry import Registry
from service.scorer import Scorer
def test_probe(tiny_bundle, trained_model):
    reg, v = tiny_bundle
    b = Registry(reg).bundle(v)
    sc = Scorer(b, 1)
    test, preds = trained_model.test, trained_model.test_preds
    schema = b.schema
    print(schema == trained_model.schema)
    idx = np.arange(200)
    sub = test.iloc[idx]
    enc_rows = schema.encode_rows({c: sub[c].to_numpy() for c in sub.columns}, len(sub))
    # per row serving encode
    diffs = []
    for k, i in enumerate(idx):
        rec = {c: (x.item() if hasattr(x, "item") else x) for c, x in test.iloc[i].items()}
        inp = schema.encode({n: rec[n] for n in schema.names("user")}, {n: rec[n] for n in schema.names("context")}, {n: [rec[n]] for n in schema.names("item")}, 1)
        out = sc.score(inp)
        for key in inp:
            a = inp[key][0]; bb = enc_rows[key][k]
            if not np.array_equal(a, bb): print("ENC DIFF", i, key, a, bb)
        diffs.append(abs(out["watch_time"][0] - preds["watch_time"][i]) / preds["watch_time"][i])
    print("max rel diff", max(diffs), np.argmax(diffs))
    print(test.dtypes)

"""The analysis room: offline studies of trained models, beside the fit path - the fusion search
and ``vidrank tune-fusion`` (``fusion_search``, ``tune``, ``profiles``), the per-version report and
its plots (``report``, ``plots``), architecture comparisons, sweeps and learning curves
(``compare``, ``experiment``, ``curve``) and gradient-transfer diagnostics (``transfer``).
It uses the fit path; the fit path never imports it (import-linter enforces this)."""

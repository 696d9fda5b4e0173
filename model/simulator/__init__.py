"""The simulator room: a KuaiRand-like world with ground truth (``world``), written as Parquet in
KuaiRand's schema plus truth columns. Offline only (numpy + pandas): ``vidrank simulate``, the
training data sources, the truth metrics and the analysis sweeps read it; the service never does."""

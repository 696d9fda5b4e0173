"""vidrank offline side: features, simulator, MMoE, trainer, export, bundle and registry.

Importing this package imports nothing heavy; torch is only needed by the training modules.
"""

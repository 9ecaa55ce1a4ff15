"""The Feast feature repository (``feature_store.yaml`` + ``definitions.py``).

Installed as the package ``microstructure.feature_repo`` so a wheel carries it; ``cd feature_repo`` and the
Feast CLI use it in place from a checkout.
"""

"""YAML recipes and configs shipped with finger-reward (importable so the defaults travel with the package)."""

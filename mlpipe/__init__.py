"""mlpipe: train scikit-learn models from a YAML spec, version them in a registry, serve and deploy them."""
__version__ = "0.1.0"

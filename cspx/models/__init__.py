"""Model family: `create_model(name)` builds any entry of the config table in cspnet.py."""
from cspx.models.cspnet import CspConfig, CspNet, create_model, list_models, model_config
from cspx.models.layers import convert_sync_batchnorm

__all__ = ["CspConfig", "CspNet", "convert_sync_batchnorm", "create_model", "list_models",
           "model_config"]

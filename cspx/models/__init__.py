"""The model, built at setup and by the tools: `create_model(name)` builds any entry of the
config table in cspnet.py."""
from cspx.models.cspnet import (
    CspConfig,
    CspNet,
    EvalPreset,
    create_model,
    eval_preset,
    eval_protocol,
    list_models,
    model_config,
)
from cspx.models.layers import convert_sync_batchnorm

__all__ = ["CspConfig", "CspNet", "EvalPreset", "convert_sync_batchnorm", "create_model",
           "eval_preset", "eval_protocol", "list_models", "model_config"]

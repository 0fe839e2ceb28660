from emae.models.emae import EMAE, EMAEOutput
from emae.models.export import load_encoder, load_pretrained, save_encoder

__all__ = ["EMAE", "EMAEOutput", "load_encoder", "load_pretrained", "save_encoder"]

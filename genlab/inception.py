"""The standard FID feature extractor: torch-fidelity's InceptionV3, from a weights file the user gives.

Nothing is downloaded. ``inception_weights=PATH`` names torch-fidelity's
weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth:
both hold the TensorFlow FID Inception under the same keys.
"""

import hashlib
import io
import textwrap
from pathlib import Path

import torch

from genlab.errors import GenlabError

WEIGHTS = ("the FID Inception weights: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
           "or pytorch-fid's pt_inception-2015-12-05-6726825d.pth")


def load_inception(path, device):
    """InceptionV3 giving the 2048-d pool features, with the weights in ``path``; (net, info)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise GenlabError("inception_weights= needs torch-fidelity: pip install 'genlab[inception]' "
                          "(or pip install torch-fidelity).") from e
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise GenlabError(f"inception_weights={path}: no such file. Give {WEIGHTS}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GenlabError(f"inception_weights={path} is not a weights file that PyTorch reads with weights_only=True "
                          f"({type(e).__name__}); it should be {WEIGHTS}.") from e
    if not isinstance(state, dict):
        raise GenlabError(f"inception_weights={path} holds a {type(state).__name__}, not a state dict; "
                          f"it should be {WEIGHTS}.")
    buf = io.BytesIO()  # torch-fidelity reads with weights_only=False: it gets what was read safely above
    torch.save(state, buf)
    buf.seek(0)
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    except RuntimeError as e:  # missing or unexpected keys, wrong shapes
        detail = textwrap.shorten(str(e).strip().splitlines()[-1], 160)
        raise GenlabError(f"inception_weights={path} does not fit InceptionV3 ({detail}); "
                          f"it should be {WEIGHTS}.") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return net.to(device), {"weights": str(path), "sha256": digest[:12]}


@torch.inference_mode()
def inception_features(net, images: torch.Tensor, device, batch_size: int = 50) -> torch.Tensor:
    """Features [N, 2048] of uint8 or [0, 1] float images [N, C, H, W], on the CPU. The FID protocol:
    uint8 pixels, grayscale repeated to 3 channels, resized to 299x299 by torch-fidelity as TensorFlow did."""
    feats = []
    for x in images.split(batch_size):
        if x.dtype != torch.uint8:
            x = x.float().mul(255).round().clamp(0, 255).to(torch.uint8)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        feats.append(net(x.to(device))[0].cpu())
    return torch.cat(feats)

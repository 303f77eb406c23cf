"""Optional face restoration of the pasted region: ``--enhancer {none,gfpgan,codeformer}``.

After the generated mouth is pasted, the padded face box of the frame is resized to 512 x 512,
restored by GFPGAN v1.4 or CodeFormer, resized back to the box and mixed into the frame through the
same weights the paste used (the feather ellipse, the landmark mask, or the whole box with
``--blend none``), so every pixel the paste left alone is left alone again, bit for bit.

The networks come from ``spandrel`` (GFPGANv1Clean, MIT) and ``spandrel-extra-arches`` (CodeFormer;
the package is MIT, CodeFormer's code and weights are under the non-commercial S-Lab License 1.0),
which load the published state dicts as they are. The original ``gfpgan`` / ``basicsr`` packages are
not used: ``import basicsr`` (1.4.2, 2022, the last release) fails on torchvision >= 0.17, which
removed ``torchvision.transforms.functional_tensor`` (docs/faces.md). The weights are never
downloaded: the user brings them with ``--enhancer_path``.

Published layouts (``GFPGANv1.4.pth`` of GFPGAN's v1.3.0 release; ``codeformer.pth`` of CodeFormer's
v0.1.0 release): a dict whose ``params_ema`` holds the network's state dict; 512 x 512 RGB
input and output, values in [-1, 1].
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from lipsync.core.errors import Wav2LipError

ENHANCERS = ("none", "gfpgan", "codeformer")
ENHANCE_SIZE = 512           # both networks' input and output side, pixels
DEFAULT_FIDELITY = 0.5       # CodeFormer's w (its own script's default): 0 = most restoration, 1 = most fidelity
MAX_BATCH = 8                # faces per forward: bounds the 512 x 512 activations held at once (not measured on a GPU)
INSTALL = "pip install -r requirements-faces.txt"


@dataclass(frozen=True)
class EnhancerWeights:
    """Where the published weights of one enhancer come from."""

    file: str       # the published file name
    source: str     # where to get it
    licence: str


WEIGHTS = {
    "gfpgan": EnhancerWeights(
        "GFPGANv1.4.pth", "the GFPGAN releases (https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/"
        "GFPGANv1.4.pth)", "the GFPGAN repository's Apache-2.0; trained on FFHQ (data set: CC BY-NC-SA 4.0)"),
    "codeformer": EnhancerWeights(
        "codeformer.pth", "the CodeFormer releases (https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/"
        "codeformer.pth)", "S-Lab License 1.0: non-commercial use only"),
}


class EnhancerError(Wav2LipError, ValueError):
    """An enhancer that cannot be used: unknown name, weights missing or of another model, package missing."""


def _architecture(name: str):
    """spandrel's Architecture object for ``name``; EnhancerError naming INSTALL when the package is missing."""
    try:
        with warnings.catch_warnings():
            # spandrel-extra-arches scripts a helper at import; torch warns that torch.jit.script is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            if name == "gfpgan":
                from spandrel.architectures.GFPGAN import GFPGANArch

                return GFPGANArch()
            from spandrel_extra_arches.architectures.CodeFormer import CodeFormerArch

            return CodeFormerArch()
    except ImportError as exc:
        package = "spandrel" if name == "gfpgan" else "spandrel-extra-arches"
        raise EnhancerError(f"--enhancer {name} needs the {package} package ({exc}); {INSTALL}") from None


def check_enhancer(name: str, path: Optional[str], fidelity: float = DEFAULT_FIDELITY) -> None:
    """What :func:`load_enhancer` would refuse, without loading: an unknown ``name``, a ``fidelity`` outside
    [0, 1], a missing package (naming ``pip install -r requirements-faces.txt``), or no weights file at
    ``path`` (naming the file to get and ``--enhancer_path``). Raises EnhancerError."""
    if name not in ENHANCERS:
        raise EnhancerError(f"--enhancer must be one of {', '.join(ENHANCERS)}, got {name!r}")
    if name == "none":
        return
    if not 0.0 <= fidelity <= 1.0:
        raise EnhancerError(f"--enhancer_weight is CodeFormer's fidelity, in [0, 1]; got {fidelity:g}")
    _architecture(name)
    want = WEIGHTS[name]
    if not path:
        raise EnhancerError(f"--enhancer {name} needs its weights: get {want.file} from {want.source} and pass "
                            f"--enhancer_path {want.file} (nothing is downloaded)")
    if not os.path.isfile(path):
        raise EnhancerError(f"--enhancer_path not found: {path!r}; get {want.file} from {want.source} "
                            "(nothing is downloaded)")


def read_state_dict(path: str) -> dict:
    """The network's state dict in a weights file: a dict's ``params_ema`` (the published layout),
    ``params`` or ``state_dict``, or the dict itself; ``module.`` prefixes removed. Tensors only
    (``torch.load(weights_only=True)``); EnhancerError for a file torch cannot read that way."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a weights file we can read"
        raise EnhancerError(f"--enhancer_path {path!r} is not a PyTorch weights file of tensors ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(data, dict):
        raise EnhancerError(f"--enhancer_path {path!r} holds a {type(data).__name__}, not a state dict")
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(data.get(key), dict):
            data = data[key]
            break
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


class FaceEnhancer:
    """A loaded face restorer: (B, 3, 512, 512) BGR faces in, restored faces out, ``MAX_BATCH`` faces per forward.

    ``name``: ``"gfpgan"`` or ``"codeformer"``; ``model``: the torch module (eval mode, on ``device``, fp32);
    ``fidelity``: CodeFormer's w in [0, 1] (GFPGAN has none). GFPGAN's StyleGAN decoder runs with the
    noise maps stored in the weights (``randomize_noise=False``), so a face restored twice is the same
    face (the published script draws new noise on each call, so the same face can differ between frames).
    fp32 everywhere: spandrel marks both networks as not supporting fp16.
    """

    def __init__(self, name: str, model: torch.nn.Module, device, fidelity: float = DEFAULT_FIDELITY):
        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.fidelity = float(fidelity)
        self.forwards = 0  # forward passes run (a batch of up to MAX_BATCH faces each)

    @torch.no_grad()  # not inference_mode: callers round and clip the result in place
    def restore(self, faces: torch.Tensor) -> torch.Tensor:
        """Restore ``faces``: (B, 3, 512, 512) float BGR grey levels 0..255 on any device. Returns the
        same shape and units on the same device, not rounded; B = 0 is allowed. Raises EnhancerError
        for another shape."""
        if faces.ndim != 4 or tuple(faces.shape[1:]) != (3, ENHANCE_SIZE, ENHANCE_SIZE):
            raise EnhancerError(f"faces must be (B, 3, {ENHANCE_SIZE}, {ENHANCE_SIZE}), got {tuple(faces.shape)}")
        out = []
        for start in range(0, len(faces), MAX_BATCH):
            x = faces[start:start + MAX_BATCH].to(self.device, torch.float32)
            # (b, 3, 512, 512) RGB in [-1, 1]; contiguous: GFPGAN .view()s a feature map, which fails on the
            # channels-last layout that permuted host crops would carry through its convolutions
            x = (x.flip(1) / 127.5 - 1.0).contiguous()
            if self.name == "gfpgan":
                y = self.model(x, return_rgb=False, randomize_noise=False)[0]
            else:
                y = self.model(x, weight=self.fidelity)[0]
            self.forwards += 1
            out.append(((y.clamp(-1.0, 1.0) + 1.0) * 127.5).flip(1).to(faces.device))   # BGR 0..255
        return torch.cat(out) if out else faces.new_zeros(faces.shape)

    def restore_crops(self, crops: np.ndarray) -> np.ndarray:
        """:meth:`restore` for host crops: (B, 512, 512, 3) uint8 BGR in, (B, 512, 512, 3) uint8 BGR out (rounded)."""
        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()   # (B, 3, 512, 512)
        y = self.restore(x).round_().clamp_(0, 255).to(torch.uint8)
        return y.permute(0, 2, 3, 1).numpy()                                               # (B, 512, 512, 3)


def load_enhancer(name: str, path: Optional[str], device="cpu", fidelity: float = DEFAULT_FIDELITY
                  ) -> Optional[FaceEnhancer]:
    """The enhancer ``name`` (one of ENHANCERS; ``"none"``: None) with the weights at ``path``, on ``device``.

    ``path``: the published ``GFPGANv1.4.pth`` or ``codeformer.pth`` (a dict with ``params_ema``), or
    the bare state dict. ``fidelity``: CodeFormer's w, in [0, 1]. Raises EnhancerError for an unknown
    name, a missing package (naming ``pip install -r requirements-faces.txt``), a missing file (naming
    the file to get and ``--enhancer_path``), a file that is not the state dict of that network, or a
    fidelity outside [0, 1]."""
    check_enhancer(name, path, fidelity)
    if name == "none":
        return None
    arch, want = _architecture(name), WEIGHTS[name]
    state = read_state_dict(path)
    if not arch.detect(state):
        raise EnhancerError(f"--enhancer_path {path!r} is not a {arch.id} state dict (first keys: "
                            f"{', '.join(list(state)[:3]) or 'none'}); --enhancer {name} needs {want.file} "
                            f"from {want.source}")
    try:
        descriptor = arch.load(state)
    except (RuntimeError, KeyError, ValueError) as exc:  # shapes or keys of another variant of the network
        raise EnhancerError(f"--enhancer_path {path!r} does not fit {arch.id} ({str(exc).splitlines()[0]}); "
                            f"--enhancer {name} needs {want.file} from {want.source}") from None
    return FaceEnhancer(name, descriptor.model, device, fidelity)



def build_network(name: str) -> torch.nn.Module:
    """A fresh ``name`` network (``"gfpgan"`` or ``"codeformer"``) with the published weights' sizes,
    from spandrel's classes: GFPGANv1Clean with GFPGAN v1.4's hyperparameters (those spandrel's
    GFPGANArch.load uses), CodeFormer with its defaults (codeformer.pth's sizes). Its own random init."""
    _architecture(name)  # EnhancerError naming the pip command when the package is missing
    if name == "gfpgan":
        from spandrel.architectures.GFPGAN import GFPGAN

        return GFPGAN(out_size=ENHANCE_SIZE, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                      fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    return CodeFormer()


def save_filled_weights(name: str, path: str, seed: int = 0, std: float = 0.02) -> str:
    """Write stand-in weights of ``name`` to ``path`` in the published layout (``{"params_ema": state
    dict}``): every float tensor drawn from N(0, std^2) by a generator seeded with ``seed``. For tests
    and speed measurements: the network runs as with the real weights, its faces are noise. Returns ``path``."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=gen) * std if v.is_floating_point() else v)
             for k, v in build_network(name).state_dict().items()}
    torch.save({"params_ema": state}, path)
    return path

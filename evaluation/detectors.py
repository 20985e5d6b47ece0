"""The networks FVD and FID are computed with, loaded from the TorchScript files the common
implementations use, and the preprocessing those implementations apply.

- I3D (FVD; Unterthiner et al. 2018): `i3d_torchscript.pt`, the Kinetics-400 I3D exported to
  TorchScript by the StyleGAN-V authors and used by its FVD code and by the projects that followed
  it (DIGAN, MoCoGAN-HD comparisons, "fvd-comparison"). Called as
  `model(x, rescale=False, resize=False, return_features=True)` on float clips [N, 3, T, 224, 224]
  in [-1, 1] (shorter side resized to 224, bilinear, centre crop) -> features [N, 400].
- Inception-v3 (FID; Heusel et al. 2017): `inception-2015-12-05.pt`, the TensorFlow FID network
  exported to TorchScript for StyleGAN2-ADA and used by clean-fid. Called as
  `model(x, return_features=True)` on float images [N, 3, 299, 299] in [0, 255] (bicubic resize
  with antialiasing, as clean-fid) -> pool features [N, 2048].

Loading never unpickles Python objects: a TorchScript archive (zip with `code/`) is read by
TorchScript's own deserializer, which rebuilds only tensors and the TorchScript classes whose code
is in the archive and refuses any other global (tests/test_evaluation.py feeds it a pickle that
would run a shell command). A `torch.save` file (a plain pickle) is refused before it is opened.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class DetectorError(ValueError):
    """A detector file that is missing, not the expected one, or not of the expected interface."""


@dataclass(frozen=True)
class DetectorSpec:
    kind: str  # "i3d" | "inception"
    metric: str  # what it is used for
    file: str  # the usual file name
    source: str  # where users get it
    sha256: str  # the pinned hash; "" = not pinned in this project (see README "Evaluation")
    features: int  # feature width
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the call
    probe: tuple = ()  # an input shape that checks the interface


I3D = DetectorSpec("i3d", "FVD", "i3d_torchscript.pt", "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt",
                   "", 400, {"rescale": False, "resize": False, "return_features": True}, (1, 3, 16, 224, 224))
INCEPTION = DetectorSpec("inception", "FID", "inception-2015-12-05.pt",
                         "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
                         "", 2048, {"return_features": True}, (1, 3, 299, 299))
SPECS = {s.kind: s for s in (I3D, INCEPTION)}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_torchscript_archive(path: Path, spec: DetectorSpec) -> None:
    if not zipfile.is_zipfile(path):
        raise DetectorError(f"{spec.kind} weights {path}: not a TorchScript file (not a zip archive)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not any("/code/" in n for n in names):
        raise DetectorError(f"{spec.kind} weights {path}: a torch.save checkpoint, not a TorchScript file (it holds no "
                            "code/); opening it would mean unpickling, which this project never does. Use the "
                            f"TorchScript export ({spec.file}, from {spec.source})")


@dataclass
class Detector:
    model: torch.jit.ScriptModule
    spec: DetectorSpec
    sha256: str
    pinned: bool  # the hash was checked against an expected one

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x, **self.spec.kwargs)
        return out.reshape(len(x), -1).double()


def load_detector(path, kind: str, expected_sha256: str = "", device="cpu") -> Detector:
    """The `kind` ("i3d" | "inception") network from a TorchScript file, with its hash checked
    (against `expected_sha256`, else the pinned one when the project has it) and its interface
    probed (keyword arguments, output [1, features], finite)."""
    spec = SPECS[kind]
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"{kind} weights {path}: no such file (get {spec.file} from {spec.source})")
    sha = file_sha256(path)
    expected = (expected_sha256 or spec.sha256).lower()
    if expected and sha != expected:
        raise DetectorError(f"{kind} weights {path}: sha256 {sha[:16]}... is not the expected {expected[:16]}...: "
                            f"not the {spec.metric} network the published numbers use ({spec.file} from {spec.source})")
    _check_torchscript_archive(path, spec)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream, but it is the format these files are in
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - any failure to read the archive is the same user error
        raise DetectorError(f"{kind} weights {path}: TorchScript could not load it ({type(e).__name__}: {e})") from None
    args = {a.name for a in model.forward.schema.arguments}
    missing = sorted(set(spec.kwargs) - args)
    if missing:
        raise DetectorError(f"{kind} weights {path}: its forward() takes no {', '.join(missing)}: not the {spec.file} "
                            f"interface (forward(x, {', '.join(f'{k}=...' for k in spec.kwargs)}))")
    det = Detector(model.to(device), spec, sha, bool(expected))
    try:
        out = det(torch.zeros(spec.probe, device=device))
    except Exception as e:  # noqa: BLE001
        raise DetectorError(f"{kind} weights {path}: fails on an input of shape {list(spec.probe)} "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    if out.shape != (1, spec.features) or not torch.isfinite(out).all():
        raise DetectorError(f"{kind} weights {path}: returns {list(out.shape)} for one input; {spec.file} returns "
                            f"[1, {spec.features}] finite features")
    return det


def i3d_input(videos: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> float [N, 3, T, size, size] in [-1, 1]: shorter side to `size`
    (bilinear), centre crop, as the StyleGAN-V / fvd-comparison FVD code."""
    x = torch.as_tensor(np.asarray(videos)).float().div(255)
    n, t, h, w, _ = x.shape
    frames = x.reshape(n * t, h, w, 3).permute(0, 3, 1, 2)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    frames = frames[:, :, top : top + size, left : left + size]
    return (frames.reshape(n, t, 3, size, size).permute(0, 2, 1, 3, 4) * 2 - 1).contiguous()


def inception_input(frames: np.ndarray, size: int = 299) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, size, size] in [0, 255] (bicubic with antialiasing, the
    resize clean-fid recommends over the aliased one)."""
    x = torch.as_tensor(np.asarray(frames)).float().permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255)


def video_features(det: Detector, videos: np.ndarray, batch_size: int = 8) -> torch.Tensor:
    """I3D features [N, 400] (float64) of uint8 videos [N, T, H, W, 3]."""
    dev = next(det.model.parameters(), torch.zeros(0)).device
    return torch.cat([det(i3d_input(videos[i : i + batch_size]).to(dev)).cpu() for i in range(0, len(videos), batch_size)])


def frame_features(det: Detector, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """Inception features [N, 2048] (float64) of uint8 frames [N, H, W, 3]."""
    dev = next(det.model.parameters(), torch.zeros(0)).device
    return torch.cat([det(inception_input(frames[i : i + batch_size]).to(dev)).cpu()
                      for i in range(0, len(frames), batch_size)])  # fmt: skip

"""Import-compatible stand-in for ``torchaudio`` (higgs-tune).

Why: PyPI has no torchaudio build for torch 2.13 (the newest, 2.11, refuses to load its C++
library against torch 2.13), and the real torchaudio wheels drag CUDA packages onto CPU machines.
boson-multimodal 0.1.1 calls exactly one torchaudio function, ``torchaudio.functional.resample``
(in ``HiggsAudioTokenizer.get_regress_target``); descript-audiotools only imports the module.
This package provides that function via ``julius`` (the library torchaudio's resampler was
derived from) and raises a clear error for everything else.

Install the real torchaudio instead when one matching your torch exists; nothing in higgs-tune
depends on this shim beyond ``functional.resample``.
"""

from . import functional  # noqa: F401

__version__ = "0.0.0+higgstune.shim"


def __getattr__(name: str):
    raise AttributeError(
        f"torchaudio.{name} is not available: this is higgs-tune's torchaudio shim, which provides only "
        "torchaudio.functional.resample. Install a real torchaudio that matches your torch to use it."
    )

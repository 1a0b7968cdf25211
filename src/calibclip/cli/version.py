"""`calibclip version`: print the package, torch and device versions."""

from __future__ import annotations

import argparse
import platform


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser("version", help="print versions of calibclip, torch and Python")


def run(args: argparse.Namespace) -> int:
    import torch

    from calibclip import __version__

    cuda = torch.version.cuda if torch.cuda.is_available() else "not available"
    print(f"calibclip {__version__}\ntorch {torch.__version__} (CUDA {cuda})\nPython {platform.python_version()}")
    return 0

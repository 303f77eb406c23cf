"""What the command-line scripts share about their ``--help``: one formatter and the help texts of
the flags every script has."""
from __future__ import annotations

import argparse

DEVICE_HELP = "where to run: auto picks cuda, then mps, then cpu"
QUIET_HELP = "no progress bars"
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
PRECISION_HELP = ("generator precision: auto = bf16 on CPUs with bf16 matrix units (AMX, AVX512-BF16), fp16 on "
                  "CUDA, else fp32; int8 = ONNX Runtime on the CPU, quantized and calibrated on this job's face and "
                  "audio (docs/onnx.md)")
THREADS_HELP = "CPU threads for the generator (None: chosen while running from measured speed)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that keeps the description's own line breaks (the scripts' docstrings show
    commands and tables) and shows every flag's default after its help text."""

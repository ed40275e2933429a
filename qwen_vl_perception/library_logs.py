"""Quiet third-party libraries' start-up noise (a bitsandbytes warning, transformers' progress
bars) in the node and the tools."""
import logging
import os
import sys


def quiet_library_logs() -> None:
    """Hide a bitsandbytes start-up warning that is noise for these tools.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 looks for an optional kernel that the
    ``kernels`` package would download from a model hub, and logs a warning asking to install
    it; the built-in CPU kernel works without it.
    """
    logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.ERROR)


def quiet_progress_bars() -> None:
    """No "Loading weights" progress bar each time a tool loads a model.

    transformers reads the switch when it is imported (``HF_HUB_DISABLE_PROGRESS_BARS``);
    when it is imported already, its own switch is turned off. A user's explicit setting of
    the variable is kept. Training and detection progress are the tools' own bars.
    """
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    if os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] != '1':
        return
    hf_logging = sys.modules.get('transformers.utils.logging')
    if hf_logging is not None:
        hf_logging.disable_progress_bar()

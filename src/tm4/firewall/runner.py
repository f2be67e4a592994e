"""Running nft: libnftables in-process when possible (a fork+exec costs ~2 ms), else `nft -f -`.

With a network namespace, the in-process library runs on one worker thread that
entered the namespace (setns switches only the calling thread's netns).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

from tm4.core.errors import ApplyError
from tm4.firewall.netns import enter_netns

# libnftables output flags (nftables.h): -j, -t (no set contents), -s (no counters)
OUT_STATELESS = 1 << 2
OUT_JSON = 1 << 4
OUT_TERSE = 1 << 11


class _LibNft:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, script: str, json_out: bool = False, terse: bool = False) -> tuple[int, str, str]:
        flags = (OUT_JSON if json_out else 0) | (OUT_TERSE | OUT_STATELESS if terse else 0)
        self.lib.nft_ctx_output_set_flags(self.ctx, flags)
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode()
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode()
        return rc, out, err


class NftRunner:
    def __init__(self, netns: str = "", use_library: bool = True):
        self.netns = netns
        self._lib: _LibNft | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if use_library and os.environ.get("TM4_NFT_SUBPROCESS") != "1":
            try:
                if netns:
                    self._pool = ThreadPoolExecutor(1, initializer=self._enter_netns)
                    self._lib = self._pool.submit(_LibNft).result()
                else:
                    self._lib = _LibNft()
            except (OSError, ApplyError, RuntimeError):  # RuntimeError: BrokenThreadPool (no netns)
                self._lib = None
                self._pool = None

    def _enter_netns(self) -> None:
        enter_netns(self.netns)

    def run(self, script: str, json_out: bool = False, terse: bool = False) -> str:
        """Run an nft script as one transaction; raise ApplyError with nft's own message.
        `terse` leaves set contents and counters out of listings."""
        with self._lock:
            if self._lib is not None:
                if self._pool is not None:
                    rc, out, err = self._pool.submit(self._lib.run, script, json_out, terse).result()
                else:
                    rc, out, err = self._lib.run(script, json_out, terse)
            else:
                rc, out, err = self._subprocess(script, json_out, terse)
        if rc != 0:
            raise ApplyError(f"nft refused the change: {first_error(err)}")
        return out

    def _subprocess(self, script: str, json_out: bool, terse: bool = False) -> tuple[int, str, str]:
        argv = ["nft"] + (["-j"] if json_out else []) + (["-t", "-s"] if terse else []) + ["-f", "-"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        try:
            p = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise ApplyError("nft is not installed (Debian package nftables)") from None
        return p.returncode, p.stdout, p.stderr


def first_error(err: str) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for ln in lines:
        if "Error" in ln:
            return ln
    return lines[0] if lines else "unknown error"

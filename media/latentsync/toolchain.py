"""The C++ compiler AOTInductor builds with: one whose shared libraries use the process's
C++ runtime.

AOTInductor compiles each package's model library with the machine's C++ compiler. If
that compiler links libstdc++ statically into shared libraries (a site wrapper that adds
`-static-libstdc++`, say), the library carries its own copy of the C++ runtime beside the
one torch already loaded, and the two share some symbols and not others. torch 2.11's
CUDA model container then segfaults while it is being created: its device string is
parsed with `std::regex`, whose locale facets straddle both copies (native backtrace on
the H100 machines, `bench/results/aoti_doctor_h100.md`).

`aoti_compiler()` probes the candidates in order (Inductor's own choice first) by
building a one-function shared library with each and reading which libraries it needs;
the first that needs `libstdc++.so` wins. `needed_libraries` reads an ELF file's
DT_NEEDED entries without binutils.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

# A function that needs the C++ runtime (std::regex is what the crash went through).
PROBE_SOURCE = """
#include <regex>
#include <string>
bool probe_matches(const std::string& text) { return std::regex_match(text, std::regex("[a-z]+")); }
"""
PROBE_TIMEOUT_S = 120.0


class ToolchainError(RuntimeError):
    """No C++ compiler here builds shared libraries on the process's C++ runtime."""


def needed_libraries(path: Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared library, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, align, entsize) per section
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size)
                for i in range(count)]
    names: list[str] = []
    for section in sections:
        if section[1] != 6:  # SHT_DYNAMIC
            continue
        strings = sections[section[6]][4]  # its string table's file offset
        body = data[section[4]:section[4] + section[5]]
        for tag, value in struct.iter_unpack("<qQ", body):
            if tag == 0:  # DT_NULL ends the table
                break
            if tag == 1:  # DT_NEEDED
                start = strings + value
                names.append(data[start:data.index(b"\0", start)].decode())
    return names


def links_cxx_runtime_dynamically(compiler: str) -> bool | None:
    """Whether `compiler` builds shared libraries that need libstdc++.so (or libc++.so);
    None when it cannot build the probe at all."""
    with tempfile.TemporaryDirectory() as folder:
        source, library = Path(folder, "probe.cpp"), Path(folder, "probe.so")
        source.write_text(PROBE_SOURCE)
        try:
            built = subprocess.run(
                [compiler, "-shared", "-fPIC", "-O0", "-o", str(library), str(source)],
                capture_output=True, timeout=PROBE_TIMEOUT_S, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if built.returncode != 0 or not library.is_file():
            return None
        needed = needed_libraries(library)
    return any(name.startswith(("libstdc++.so", "libc++.so")) for name in needed)


def candidate_compilers(first: str | None = None) -> list[str]:
    """Compilers to try, as absolute paths, each once: `first` (Inductor's choice), $CXX,
    then the usual names on PATH and in /usr/bin (a wrapper earlier on PATH can hide
    the distribution's own compiler)."""
    names = [n for n in (first, os.environ.get("CXX")) if n]
    names += ["g++", "c++", "clang++", *(f"g++-{v}" for v in range(16, 8, -1))]
    names += ["/usr/bin/g++", "/usr/bin/c++", "/usr/bin/clang++"]
    found: list[str] = []
    for name in names:
        path = shutil.which(name)
        if path and path not in found:
            found.append(path)
    return found


@functools.lru_cache(maxsize=1)
def aoti_compiler() -> str:
    """The first candidate whose shared libraries use the process's C++ runtime; raises
    ToolchainError naming what was tried. Probed once per process."""
    from torch._inductor import cpp_builder

    try:
        first: str | None = cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - Inductor found none; the list below still may
        first = None
    tried = []
    for compiler in candidate_compilers(first):
        dynamic = links_cxx_runtime_dynamically(compiler)
        if dynamic:
            return compiler
        tried.append(f"{compiler} ({'no build' if dynamic is None else 'static C++ runtime'})")
    raise ToolchainError(
        "no C++ compiler here builds shared libraries that use the shared C++ runtime"
        f" (tried: {', '.join(tried) or 'none found'}); AOTInductor's CUDA loader crashes"
        " on libraries with their own static copy. Set CXX to a g++ or clang++ that links"
        " libstdc++ dynamically, or turn renderer.latentsync.aot off"
    )

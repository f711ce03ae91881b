"""The compiler AOTInductor builds with: real compiles with this machine's g++, and a
site-style wrapper that links libstdc++ statically (what the H100 machines' g++ does)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from media.latentsync import toolchain
from media.latentsync.toolchain import (
    ToolchainError,
    aoti_compiler,
    candidate_compilers,
    links_cxx_runtime_dynamically,
    needed_libraries,
)

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++"),
]


def static_wrapper(folder: Path, name: str = "g++") -> Path:
    """A g++ that adds -static-libstdc++ to every command, as a site wrapper might."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / name
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(autouse=True)
def fresh_choice() -> Iterator[None]:
    aoti_compiler.cache_clear()
    yield
    aoti_compiler.cache_clear()


def test_needed_libraries_reads_what_a_shared_library_links(tmp_path: Path) -> None:
    source, library = tmp_path / "x.cpp", tmp_path / "x.so"
    source.write_text(toolchain.PROBE_SOURCE)
    subprocess.run([shutil.which("g++") or "g++", "-shared", "-fPIC", "-o", str(library),
                    str(source)], check=True)
    needed = needed_libraries(library)
    assert any(n.startswith("libstdc++.so") for n in needed)
    assert any(n.startswith("libc.so") for n in needed)
    (tmp_path / "text").write_text("not a library")
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        needed_libraries(tmp_path / "text")


def test_a_compiler_that_links_libstdcxx_statically_is_told_apart(tmp_path: Path) -> None:
    assert links_cxx_runtime_dynamically(shutil.which("g++") or "g++") is True
    assert links_cxx_runtime_dynamically(str(static_wrapper(tmp_path))) is False
    assert links_cxx_runtime_dynamically(str(tmp_path / "no-such-compiler")) is None


def test_the_first_compiler_on_the_shared_runtime_is_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A static wrapper first on PATH and as $CXX: the distribution's g++ is taken."""
    wrapper = static_wrapper(tmp_path / "bin")
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/usr/bin:/bin")
    found = candidate_compilers()
    assert found[0] == str(wrapper)
    chosen = aoti_compiler()
    assert chosen != str(wrapper)
    assert links_cxx_runtime_dynamically(chosen) is True


def test_no_compiler_on_the_shared_runtime_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapper = static_wrapper(tmp_path)
    monkeypatch.setattr(toolchain, "candidate_compilers", lambda first=None: [str(wrapper)])
    with pytest.raises(ToolchainError, match=r"static C\+\+ runtime.*Set CXX.*aot off"):
        aoti_compiler()

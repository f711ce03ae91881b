"""LatentSync (ByteDance, Apache-2.0) lip-sync model: our code, loading its released weights.

Import from the submodules (`unet`, `checkpoint`, `config`, ...): this package
imports nothing so that using one part does not load the others' dependencies.
"""

"""Export to / import from Hugging Face folders (`megaxatl export-hf`, `megaxatl import-hf`).

    from megaxatl.export import export_hf, import_hf
    arch = export_hf("runs/x/model", "hf/x")        # -> the chosen Arch (arch.hf_class)
    import_hf("hf/x", "runs/x/model-again")

The names resolve on first use, so that importing the command-line module stays light.
"""

__all__ = ["ARCHS", "ARCH_NAMES", "ExportError", "choose_arch", "export_hf", "fit_table", "import_hf"]


def __getattr__(name: str):
    if name in __all__:
        from megaxatl.export import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'megaxatl.export' has no attribute {name!r}")

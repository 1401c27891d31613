"""fallbackformer.export: bundles (safetensors + a verified manifest), ONNX, torch.export and Triton.

Importing this package needs torch and safetensors only; onnx, onnxscript and onnxruntime are
imported when an ONNX function is called.
"""

from fallbackformer.export.bundle import FORMAT_VERSION, BundleError, load, read_manifest, save
from fallbackformer.export.graph import CombinedGraph, served_by_codes
from fallbackformer.export.label_free_section import LABEL_FREE_SECTION  # registers the optional section
from fallbackformer.export.manifest import ManifestSection, register_section
from fallbackformer.export.onnx_export import check_onnx_parity, export_onnx, onnxruntime_vs_torch
from fallbackformer.export.program import export_program
from fallbackformer.export.triton import export_triton

__all__ = [
    "FORMAT_VERSION",
    "LABEL_FREE_SECTION",
    "BundleError",
    "CombinedGraph",
    "ManifestSection",
    "check_onnx_parity",
    "export_onnx",
    "export_program",
    "export_triton",
    "load",
    "onnxruntime_vs_torch",
    "read_manifest",
    "register_section",
    "save",
    "served_by_codes",
]

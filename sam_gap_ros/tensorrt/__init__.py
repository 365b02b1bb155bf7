"""ONNX export, TensorRT engine building and the runtime engine switch with PyTorch fallback.

``tensorrt`` itself is imported lazily: everything here works (ONNX export, ONNX Runtime
backend, sidecar validation) on machines without a GPU or TensorRT.
"""

from sam_gap_ros.tensorrt.runtime import (BACKEND_ORT, BACKEND_PYTORCH, BACKEND_TENSORRT,
                                          BackendChoice, install, install_vision_engine,
                                          installed_backend, runtime_fallback,
                                          uninstall_vision_engine)

__all__ = ['BACKEND_ORT', 'BACKEND_PYTORCH', 'BACKEND_TENSORRT', 'BackendChoice', 'install',
           'install_vision_engine', 'installed_backend', 'runtime_fallback',
           'uninstall_vision_engine']

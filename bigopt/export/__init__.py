"""Export a trained bigopt model to files that run without bigopt (or PyTorch, for ONNX).

* ``bigopt.export.onnx``: fp32 ONNX through ``torch.onnx.export(dynamo=True)`` with dynamic batch
  (and sequence) dimensions, checked against PyTorch in onnxruntime; int8 ONNX (dynamic or static
  QDQ quantization); run, accuracy and latency helpers built on onnxruntime alone.
* ``bigopt.export.executorch``: ``.pte`` programs for edge devices (ExecuTorch, XNNPACK), checked
  through ExecuTorch's own runtime. Needs the optional extra: ``pip install 'bigopt[edge]'``.
* ``bigopt.export.card``: the model card (JSON) written next to each exported file: inputs,
  preprocessing, labels, metrics, size, latency, parity and lineage, and how to run the file.

Every writer here is atomic: it writes to a temporary name in the target directory and renames
it into place only after the file has been checked, so a failed export leaves nothing behind.
The submodules are imported explicitly; this package itself imports nothing heavy.
"""

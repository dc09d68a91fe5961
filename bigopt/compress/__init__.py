"""Model compression in plain PyTorch: pruning, distillation, int8 quantization, measurement.

Modules (import them directly; this package imports nothing heavy on its own):

* ``prune``: global magnitude masks with a gradual (Zhu & Gupta) schedule, an L1 penalty, and
  structured pruning through Torch-Pruning that writes the smaller shape back into an arch dict;
* ``distill``: Hinton knowledge-distillation loss and a picklable teacher factory;
* ``quantize``: torchao int8 post-training quantization and quantization-aware training;
* ``measure``: parameter count, on-disk size, CPU latency, accuracy and perplexity.

Everything that travels to a Ray worker as a training hook (``MaskCallback``, ``DistillLoss``,
``TeacherFactory``, ``QATPrepare``) is a small picklable object, never a closure over tensors.
"""

"""The ResNet-50 to ConvNeXt-T roadmap of "A ConvNet for the 2020s" (Figure 2).

```python
from keras_convnext import roadmap

model = roadmap.build("fewer_norms", classes=10, input_shape=(64, 64, 3))
for step in roadmap.STEPS:
    sizes = roadmap.count(step.name)  # 224x224 images, 1000 classes
    print(step.label, sizes.parameters, sizes.flops / 1e9, step.paper_gflops)
```

See docs/roadmap.md for the table and what each count includes.
"""

from keras_convnext.roadmap.builder import build_network
from keras_convnext.roadmap.config import RoadmapConfig
from keras_convnext.roadmap.flops import count_flops, count_parameters, layer_flops
from keras_convnext.roadmap.networks import Counts, build, count, kernel_size_sweep
from keras_convnext.roadmap.steps import KERNEL_SIZE_SWEEP, RESNET50, STEP_NAMES, STEPS, Step, step_config

__all__ = [
    "Counts",
    "KERNEL_SIZE_SWEEP",
    "RESNET50",
    "STEPS",
    "STEP_NAMES",
    "RoadmapConfig",
    "Step",
    "build",
    "count",
    "build_network",
    "count_flops",
    "count_parameters",
    "kernel_size_sweep",
    "layer_flops",
    "step_config",
]

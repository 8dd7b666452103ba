"""The recipe's models, by the names `--model` takes."""

from official_recipes.imagenet.models import alexnet
from official_recipes.imagenet.models.alexnet import alexnet_bn
from official_recipes.imagenet.models.resnet import resnet50

MODELS = {"resnet50": resnet50, "alexnet_bn": alexnet_bn}
# Smallest --image_size each model takes (ResNet-50 reduces by 32).
MIN_IMAGE_SIZE = {"resnet50": 32, "alexnet_bn": alexnet.MIN_IMAGE_SIZE}


def build(name, num_classes, image_size):
  """The model `name` (see MODELS); ValueError naming the valid ones otherwise."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; valid: {', '.join(sorted(MODELS))}.")
  return MODELS[name](num_classes=num_classes, image_size=image_size)

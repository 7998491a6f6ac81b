"""Real models and data sets (offline, under ``FISHERTUNE_DATA``) used by the core's examples and
measurements. Independent of :mod:`fishertune.recsys`."""

from fishertune.zoo.cifar_jpeg import (
                                       CLASSES,
                                       MEAN,
                                       STD,
                                       compose,
                                       disjoint_draws,
                                       draw_per_class,
                                       evaluate_accuracy,
                                       gaussian_noise,
                                       hflip,
                                       load_cifar_jpeg,
                                       normalize,
                                       random_crop,
                                       random_hflip,
                                       random_rotation,
                                       rotate,
)
from fishertune.zoo.cifar_resnet import (
                                       GROUPS,
                                       STAGES,
                                       BasicBlock,
                                       CifarResNet,
                                       PadShortcut,
                                       load_cifar_resnet,
                                       weights_path,
)

__all__ = [
                                       "CLASSES",
                                       "GROUPS",
                                       "MEAN",
                                       "STAGES",
                                       "STD",
                                       "BasicBlock",
                                       "CifarResNet",
                                       "PadShortcut",
                                       "compose",
                                       "disjoint_draws",
                                       "draw_per_class",
                                       "evaluate_accuracy",
                                       "gaussian_noise",
                                       "hflip",
                                       "load_cifar_jpeg",
                                       "load_cifar_resnet",
                                       "normalize",
                                       "random_crop",
                                       "random_hflip",
                                       "random_rotation",
                                       "rotate",
                                       "weights_path",
]

"""The package's digit classifier on real held-out MNIST-5k digits, per class: the ceiling a class-conditional
generator's per-class accuracy (ign-fast eval, "class_accuracy") is judged against (docs/CONDITIONAL.md).

    python experiments/classifier_per_class.py
"""
import torch

from ign_fast.data import load_mnist5k
from ign_fast.metrics import class_accuracy, load_digit_classifier


def main():
    images, labels = load_mnist5k("test")
    classifier = load_digit_classifier()
    with torch.no_grad():
        logits = torch.cat([classifier(chunk) for chunk in images.split(500)])
    report = class_accuracy(logits, labels)
    print(f"{images.shape[0]} held-out real digits: per class " +
          " ".join(f"{k}:{a:.3f}" for k, a in enumerate(report["per_class"])) +
          f"; worst class {report['worst_class']} at {report['worst_accuracy']:.3f}, "
          f"mean {report['mean_accuracy']:.3f}")


if __name__ == "__main__":
    main()

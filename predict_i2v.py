"""EasyAnimate V4 image-to-video (--image, --end-image): see `python predict_i2v.py --help`."""

from easyanimate.cli import main

if __name__ == "__main__":
    main("i2v")

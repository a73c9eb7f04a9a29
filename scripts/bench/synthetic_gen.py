"""Time the synthetic clip generator: ``python scripts/bench/synthetic_gen.py [W H F]``.

Default 1920x1080x100 (needs about 3.5 GB of memory for the frames and masks).
"""

import sys
import time

from backend.synthetic import make_synthetic_clip


def main() -> None:
    width, height, n_frames = (int(a) for a in (sys.argv[1:4] or (1920, 1080, 100)))
    start = time.perf_counter()
    scene = make_synthetic_clip(width, height, n_frames)
    seconds = time.perf_counter() - start
    sizes = ", ".join(f"{t.shape[1]}x{t.shape[0]}" for t in scene.textures)
    print(f"synthetic {width}x{height}x{n_frames}: {seconds:.2f} s "
          f"({1000 * seconds / n_frames:.1f} ms/frame); textures {sizes}")


if __name__ == "__main__":
    main()

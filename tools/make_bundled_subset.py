"""Cut a class-balanced, seeded random subset out of a split/class/image .tar.gz.

    python tools/make_bundled_subset.py SRC.tar.gz OUT.tar.gz \
        --train_per_class 500 --test_per_class 100 --seed 0

SRC holds `<split>/<class>/<image>` files (e.g. the CIFAR-10 JPEGs). OUT holds, for each
class, a random sample of `--train_per_class` images of `train/` and `--test_per_class`
images of `test/`, with their original bytes and paths (nothing is re-encoded). The sample
depends only on SRC's file names and `--seed`, and OUT is byte-for-byte reproducible
(sorted entries, no name or time stamp in the gzip header). This is how
`sparta_tf/bundled/cifar10_sample.tar.gz` is made (see `sparta_tf/bundled/README.md`).
"""

import argparse
import collections
import gzip
import io
import os
import random
import tarfile


def choose(names, per_split, seed):
    """Pick `per_split[split]` names at random from each `split/class/` group."""
    groups = collections.defaultdict(list)
    for name in sorted(names):
        parts = os.path.normpath(name).split("/")  # also for "./train/..." names
        if len(parts) == 3 and parts[0] in per_split:
            groups[parts[0], parts[1]].append(name)
    rng = random.Random(seed)
    chosen = []
    for (split, cls), members in sorted(groups.items()):
        count = per_split[split]
        if len(members) < count:
            raise ValueError(f"{split}/{cls} has {len(members)} images, fewer than {count}")
        chosen.extend(rng.sample(members, count))
    return sorted(chosen)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="source .tar.gz with split/class/image files")
    parser.add_argument("out", help="the .tar.gz to write")
    parser.add_argument("--train_per_class", type=int, default=500)
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    per_split = {"train": args.train_per_class, "test": args.test_per_class}
    # One sequential pass (seeking back in a gzip stream would re-read it from the start).
    with tarfile.open(args.src, "r|gz") as src:
        files = {m.name: (m, src.extractfile(m).read()) for m in src if m.isfile()}
    chosen = choose(files, per_split, args.seed)
    # No file name and time stamp 0 in the gzip header: the same input gives the same bytes.
    with open(args.out, "wb") as f, gzip.GzipFile("", "wb", 9, f, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as out:
            for name in chosen:
                info, data = files[name]
                out.addfile(info, io.BytesIO(data))
    print(f"wrote {args.out}: {len(chosen)} images, seed {args.seed}")


if __name__ == "__main__":
    main()

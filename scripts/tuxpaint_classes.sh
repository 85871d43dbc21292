#!/usr/bin/env bash
# Tux Paint's stamps as a zero-shot classification set (README: "Zero-shot
# classification: Tux Paint stamps").
#
#   apt-get install tuxpaint-stamps-default
#   scripts/tuxpaint_classes.sh [OUT]          # OUT defaults to /tmp/tuxpaint-classes
#
# Debian's tuxpaint-stamps put their pictures in category folders under
# /usr/share/tuxpaint/stamps (animals, food, plants, vehicles, ...; env STAMPS
# to read another copy), most with a NAME.txt beside them whose first line is
# an English description ("A hedgehog."). This script writes:
#
#   OUT/all/<category>/<name>.png     every picture, by its top-level category
#                                     (an ImageFolder for `clip-wgpu zero-shot`)
#   OUT/train/<category>/<name>.png   4 of every 5 pictures of each category, with
#   OUT/train/<category>/<name>.txt   captions: `clip-wgpu train --data_dir OUT/train`
#   OUT/test/<category>/<name>.png    the 5th (and its caption): never trained on
#   OUT/classes.tsv                   folder<TAB>class name (`--classes`)
#
# Pictures are symbolic links to the originals; <name> is the picture's path
# under its category with `/` as `__` (unique). Captions are the description
# followed by the category's class name in brackets, "A hedgehog. (animals)"
# (CAPTIONS=plain: the description alone). A picture without a description
# (the 6 cartoon Tux pictures) is described by its file name ("tux drat").
# `NAME_mirror.png` pictures (11 left-right flipped copies of other stamps)
# are left out, so that no test picture has its mirror image in training.
# The split is fixed: within each category, in sorted order of paths, the
# pictures at positions 2, 7, 12, ... (counting from 0) are the test set.
set -euo pipefail

STAMPS=${STAMPS:-/usr/share/tuxpaint/stamps}
OUT=${1:-/tmp/tuxpaint-classes}
CAPTIONS=${CAPTIONS:-category}
case "$CAPTIONS" in category | plain) ;; *)
    echo "CAPTIONS must be category or plain, not '$CAPTIONS'" >&2
    exit 2
    ;;
esac
if [ ! -d "$STAMPS" ]; then
    echo "no $STAMPS: install the stamps with 'apt-get install tuxpaint-stamps-default'" >&2
    exit 1
fi

rm -rf "$OUT"
mkdir -p "$OUT/all" "$OUT/train" "$OUT/test"
printf '# folder<TAB>class name (clip-wgpu zero-shot --classes); unlisted folders keep their name\n' >"$OUT/classes.tsv"
printf 'naturalforces\tnatural forces\n' >>"$OUT/classes.tsv"

class_name() {
    case "$1" in
    naturalforces) echo "natural forces" ;;
    *) echo "$1" ;;
    esac
}

# The first non-blank line of a file, trimmed (no carriage return).
first_line() {
    sed -n 's/\r//g; /[^[:space:]]/{s/^[[:space:]]*//;s/[[:space:]]*$//;p;q;}' "$1"
}

total=0
for dir in "$STAMPS"/*/; do
    cat=$(basename "$dir")
    name=$(class_name "$cat")
    mkdir -p "$OUT/all/$cat" "$OUT/train/$cat" "$OUT/test/$cat"
    i=0
    while IFS= read -r png; do
        rel=${png#"$STAMPS/$cat/"}
        flat=${rel//\//__}
        base=${png%.png}
        desc=""
        if [ -f "$base.txt" ]; then
            desc=$(first_line "$base.txt")
        fi
        if [ -z "$desc" ]; then
            desc=$(basename "$base" | tr '_-' '  ')
        fi
        if [ "$CAPTIONS" = category ]; then
            caption="$desc ($name)"
        else
            caption="$desc"
        fi
        split=train
        if [ $((i % 5)) -eq 2 ]; then
            split=test
        fi
        ln -s "$png" "$OUT/all/$cat/$flat"
        ln -s "$png" "$OUT/$split/$cat/$flat"
        printf '%s\n' "$caption" >"$OUT/$split/$cat/${flat%.png}.txt"
        i=$((i + 1))
    done < <(find "$dir" -name '*.png' ! -name '*_mirror.png' | LC_ALL=C sort)
    total=$((total + i))
done

count() { find "$1" -name '*.png' | wc -l; }
echo "$OUT: $total pictures in $(ls "$OUT/all" | wc -l) categories;" \
    "train $(count "$OUT/train"), test $(count "$OUT/test"); captions: $CAPTIONS"
for d in "$OUT"/all/*/; do
    printf '  %-14s %4d pictures (%d test)\n' "$(basename "$d")" "$(count "$d")" "$(count "$OUT/test/$(basename "$d")")"
done

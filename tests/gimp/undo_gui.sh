#!/usr/bin/env bash
# Runs inside the GIMP rig's chroot (gimp3-rig.sh shell): GIMP 3's GUI on a private Xvfb with
# twm (GTK takes keyboard focus only from a window manager), the plug-in from PLUGIN_DIR
# installed in the rig's profile. undo_batch.py upscales; this side then presses Ctrl+Z in the
# image window, as a user would, and the batch side reports what the image holds.
# Usage: undo_gui.sh PLUGIN_DIR SPEC.json      (needs xvfb, xdotool and twm in the chroot)
set -u
plugins=$1 spec=$2
dir=$(dirname "$spec")
here=$(cd "$(dirname "$0")" && pwd)
export HOME=/root LANG=C.UTF-8 GIMP3_DIRECTORY=/var/lib/tessera/profile TESSERA_UNDO_SPEC=$spec
mkdir -p "$GIMP3_DIRECTORY/plug-ins"
cp -a "$plugins"/. "$GIMP3_DIRECTORY/plug-ins/"
f=$(mktemp /tmp/undo-xvfb.XXXXXX)
Xvfb -displayfd 3 -screen 0 1280x800x24 -nolisten tcp 3>"$f" 2>"$dir/xvfb.log" &
xv=$!
for _ in $(seq 200); do [ -s "$f" ] && break; sleep 0.05; done
export DISPLAY=":$(head -1 "$f")"
rm -f "$f"
printf 'RandomPlacement\nUsePPosition "on"\nNoTitle\n' >"$dir/twmrc"
twm -f "$dir/twmrc" >"$dir/twm.log" 2>&1 &
wm=$!
gimp-3.0 -n --batch-interpreter=python-fu-eval -b "exec(open('$here/undo_batch.py').read())" >"$dir/gimp.log" 2>&1 &
gimp=$!
ready=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ready'])" "$spec")
undone=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['undone'])" "$spec")
out=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['out'])" "$spec")
for _ in $(seq 1200); do [ -e "$ready" ] && break; sleep 0.1; done
sleep 1
win=$(xdotool search --onlyvisible --name " – GIMP" | tail -1)
xdotool windowactivate --sync "$win" 2>/dev/null || xdotool windowfocus --sync "$win"
xdotool mousemove --window "$win" 200 200 click 1
xdotool key ctrl+z
sleep 0.5
touch "$undone"
for _ in $(seq 300); do [ -e "$out" ] && break; sleep 0.1; done
kill "$gimp" 2>/dev/null; sleep 1; kill -9 "$gimp" 2>/dev/null
kill "$wm" "$xv" 2>/dev/null; wait "$xv" 2>/dev/null
[ -e "$out" ]

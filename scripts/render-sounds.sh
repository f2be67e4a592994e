#!/usr/bin/env bash
# Renders sounds/prompts.txt into Asterisk-ready prompts: sounds/en/NAME.wav
# (8 kHz, mono, 16-bit signed PCM) and sounds/en/NAME.gsm. Needs espeak-ng (or
# flite: TTS=flite) and sox. The rendered files are committed, so a PBX needs
# no speech engine. Usage: scripts/render-sounds.sh [PROMPTS [OUTDIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTS=${1:-sounds/prompts.txt}
OUT=${2:-sounds/en}
TTS=${TTS:-espeak-ng}
VOICE=${VOICE:-en-us}
for tool in "$TTS" sox; do
  command -v "$tool" >/dev/null || { echo "render-sounds: $tool is not installed" >&2; exit 1; }
done
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in ''|'#'*) continue ;; esac
  name=$(printf '%s' "${line%%|*}" | tr -d '[:space:]')
  text=$(printf '%s' "${line#*|}" | sed 's/^[[:space:]]*//;s/[[:space:]]*$//')
  if ! printf '%s' "$name" | grep -Eq '^[a-z0-9-]+$' || [ -z "$text" ]; then
    echo "render-sounds: bad line: $line" >&2; exit 1
  fi
  if [ "$TTS" = flite ]; then
    flite -t "$text" -o "$tmp/raw.wav"
  else
    espeak-ng -v "$VOICE" -s 150 -w "$tmp/raw.wav" "$text"
  fi
  # 8 kHz mono 16-bit, a little gain and 50 ms of silence at both ends
  sox -D "$tmp/raw.wav" -r 8000 -c 1 -b 16 -e signed-integer "$OUT/$name.wav" \
      gain -n -3 pad 0.05 0.05
  sox "$OUT/$name.wav" "$OUT/$name.gsm"
  n=$((n + 1))
done < "$PROMPTS"
echo "render-sounds: $n prompts in $OUT"

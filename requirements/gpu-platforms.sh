#!/usr/bin/env bash
# pip's --platform flags for the GPU image (glibc 2.36, Debian bookworm): pip matches wheel tags
# literally, so every manylinux level up to the image's glibc is named.
printf -- '--platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64'
for minor in $(seq 5 36); do printf -- ' --platform manylinux_2_%s_x86_64' "$minor"; done
echo

# Sourced on the GPU machine: install quack and the CuTe DSL (CUDA 13) from the parts that
# stage_hopper_wheels.sh made and two back-to-back calls carried (part a copied to /tmp/hopper by the
# first, .hopper/b carried by this one); exports PYTHONPATH. Returns non-zero if quack does not import.
cat /tmp/hopper/part_a .hopper/b/part_b > /tmp/hopper/cu13.tar.xz || { echo "part a missing: the machine was not kept warm"; return 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .hopper/b/*.whl || return 4
tar -xJf /tmp/hopper/cu13.tar.xz -C /tmp/site || return 5
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import cutlass, quack; print('quack', getattr(quack, '__version__', '?'))"

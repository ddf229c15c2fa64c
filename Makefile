# make demo: set up .venv, compile the bundled example end to end, print accuracy, size and bits.
# make test: set up .venv if needed and run the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT := out

.PHONY: install demo test test-fast bench clean fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p $(OUT)
	$(VENV)/bin/mpqc examples/digits_resnet.onnx -O2 --target npu4 --calib examples/digits.npz:calib \
		--eval examples/digits.npz:eval --max-drop 0.01 -o $(OUT)/digits_resnet_q.onnx \
		--report $(OUT)/digits_resnet_report.json --html $(OUT)/digits_resnet_report.html \
		--emit-bundle $(OUT)/digits_resnet_bundle.npz
	$(VENV)/bin/mpqc eval examples/digits_resnet.onnx --data examples/digits.npz:test
	$(VENV)/bin/mpqc eval $(OUT)/digits_resnet_q.onnx --data examples/digits.npz:test --runtime ort
	$(VENV)/bin/mpqc eval $(OUT)/digits_resnet_bundle.npz --data examples/digits.npz:test --runtime emulator

# two test workers, one BLAS thread each: more threads than cores only fight
TESTENV := OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# the Dask tests (marker dask) run after the rest, in a pytest process of their own
test: $(STAMP)
	$(TESTENV) $(PY) -m pytest -q -n 2 -m "not dask" -p no:cacheprovider
	$(TESTENV) $(PY) -m pytest -q -m dask -p no:cacheprovider -rs

test-fast: $(STAMP)
	$(TESTENV) $(PY) -m pytest -q -n 2 -m "not slow and not dask" -p no:cacheprovider
	$(TESTENV) $(PY) -m pytest -q -m "dask and not slow" -p no:cacheprovider -rs

# make fuzz: the long seeded fuzz run of hostile input (MPQC_FUZZ=N rounds of other seeds; default 10)
fuzz: $(STAMP)
	MPQC_FUZZ=$${MPQC_FUZZ:-10} $(TESTENV) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(OUT) .pytest_cache

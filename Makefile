# Two commands a newcomer needs: `make demo` and `make test`. Both install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

# The whole job offline on CPU: tiny Stable Diffusion, synthetic images, random-backbone reward.
demo: install
	$(PY) fake_dataset.py --data synthetic --num_data 256 --weights none --out_dir $(DEMO_DIR)
	$(PY) train.py --model=tiny --data=synthetic --num_data=256 --image_size=64 --num_epochs=5 --val_fraction=0.25 \
		--labels_path=$(DEMO_DIR)/cifar10_outputs_with_noise.npy --out_path=$(DEMO_DIR)/convnet.pth --cache_dir=$(DEMO_DIR)/cache
	$(PY) inference.py --model tiny --reward_model $(DEMO_DIR)/reward_model.pth --predictor $(DEMO_DIR)/convnet.pth \
		--prompt "A cat with a glass of water." "An astronaut on the horseback" --target 2 4 6 8 10 --guidance 100 \
		--num_images 4 --bs 4 --seed 0 --num_inference_steps 20 --out_dir $(DEMO_DIR)/figure6 --overwrite
	@echo "demo done: figures in $(DEMO_DIR)/figure6/ (grid.png, reward_vs_target.png) and $(DEMO_DIR)/loss_curve.png"

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache

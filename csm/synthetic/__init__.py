"""The synthetic dataset: a Hugging Face ``datasets`` folder with a card (``dataset``) and pushing
it to the Hub (``hub``)."""

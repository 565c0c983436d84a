"""A tiny real sentencepiece tokenizer for tests (no downloads).

``make_tiny_tokenizer(directory)`` trains a ~512-piece sentencepiece BPE model with byte fallback
and Llama's special ids (``<unk>``=0, ``<s>``=1, ``</s>``=2) from the English lines below, writes
``tokenizer.model`` and ``tokenizer_config.json`` into ``directory`` and returns it. Training runs
once per process (about a second); later calls only write the cached bytes.

Only English is trained on, so any other script (accents, CJK, emoji) encodes through the
``<0xNN>`` byte pieces: exactly what the streaming detokenizer tests need.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

VOCAB_SIZE = 512

# A simple Jinja chat template with plain-text markers, used when with_chat_template=True.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '### ' + m['role'] + ':\n' + m['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)

TRAINING_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A long stream of text flows through the model one token at a time.",
    "Memory stays constant while the window slides forward over the document.",
    "She opened the window and the cold morning air filled the room.",
    "Rivers carve valleys slowly, grain by grain, over thousands of years.",
    "The library was quiet except for the turning of pages.",
    "He asked whether the train would arrive before noon.",
    "Every evening the lighthouse keeper climbed the spiral stairs.",
    "Numbers like 42, 1024 and 3.14159 appear in many examples.",
    "The committee will meet again on Tuesday to discuss the budget.",
    "Bright stars were scattered across the dark winter sky.",
    "Please remember to water the plants while I am away.",
    "Our results show that the smaller cache performs just as well.",
    "The children built a castle of sand near the edge of the sea.",
    "Good software is simple, tested, and easy to change.",
    "The recipe calls for two eggs, a cup of flour and some sugar.",
    "Thunder rolled across the hills as the storm moved closer.",
    "Why do cats always sit on the one paper you need?",
    "The museum opens at nine and closes at five every day.",
    "A gentle breeze carried the smell of bread from the bakery.",
    "The engineer measured the bridge twice before signing the report.",
    "In the spring the fields turn green and the birds return.",
    "Questions are welcome at the end of the talk.",
    "The old map showed a path that no longer existed.",
    "They walked along the river until the sun went down.",
    "The server accepts many connections and answers each one quickly.",
    "Tomorrow will be cloudy with a chance of light rain.",
    "The orchestra tuned their instruments before the concert began.",
    "Write clear comments that explain why, not what.",
    "The farmer sold apples, pears and plums at the market.",
    "Her voice was calm, but her hands were shaking.",
    "The first chapter introduces the main characters and their town.",
    "Mountains rise above the clouds in the northern province.",
    "He fixed the bicycle with a wrench and a bit of patience.",
    "The students listened carefully as the teacher explained the proof.",
    "Attention lets each word look back at the words before it.",
    "The ship left the harbor at dawn and sailed toward the islands.",
    "Coffee, tea, or water: what would you like to drink?",
    "The garden was full of roses, tulips and tall sunflowers.",
    "A good night's sleep makes every problem look smaller.",
    "The report was finished late on Friday afternoon.",
    "Snow covered the roofs and the streets were silent.",
    "The detective noticed a small mark on the window frame.",
    "Learning a new language takes time, practice and curiosity.",
    "The baker wakes up at four to prepare the morning bread.",
    "We should test the fast path against the simple path.",
    "The wind pushed the little boat gently across the lake.",
    "Two hundred people attended the opening of the new school.",
    "The cat slept in a patch of warm sunlight on the floor.",
    "He wrote a letter to his grandmother every single week.",
    "The machine hummed quietly in the corner of the lab.",
    "Each token is turned into a vector before the first layer.",
    "The forest was dark, and the path was covered with leaves.",
    "She laughed at the joke even though she had heard it before.",
    "The price of bread rose again this year.",
    "Clouds gathered over the valley and the light grew dim.",
    "The program reads a line, processes it, and prints the answer.",
    "My brother plays the guitar and my sister plays the piano.",
    "The city lights flickered on one by one as night fell.",
    "An apple a day keeps the doctor away, or so they say.",
    "The meeting was short, friendly and surprisingly useful.",
    "Waves crashed against the rocks below the cliff.",
    "Could you tell me the way to the train station?",
    "The painter mixed blue and yellow to make a soft green.",
    "The experiment was repeated five times with the same result.",
    "Owls hunt at night and sleep through most of the day.",
    "The kitchen smelled of garlic, onions and fresh basil.",
    "A small change in the input can make a large change in the output.",
    "The bus was late, so we walked the rest of the way.",
    "He keeps his notes in a blue notebook with a torn cover.",
    "The village celebrates the harvest with music and dancing.",
    "Keys and values are stored once and read by many layers.",
    "The moon was full and bright above the quiet town.",
    "She planted a tree on the day her daughter was born.",
    "The store will be closed on Monday for repairs.",
    "Every story needs a beginning, a middle and an end.",
    "The pilot announced that we would land in twenty minutes.",
    "Heavy rain flooded the road near the old mill.",
    "The scientist wrote down every observation in careful detail.",
    "Birds sang in the trees while the kettle began to boil.",
    "The team won the final match by a single point.",
    "Old books have a special smell that new ones lack.",
    "Turn left at the bakery, then walk straight for two blocks.",
    "The wizard raised his staff and the door swung open.",
    "Fresh snow makes the whole world look clean and new.",
    "The conference starts on the third of June in the capital.",
    "He whispered the answer so that nobody else could hear.",
    "The robot picked up the red block and placed it on the blue one.",
    "Summer evenings are long, warm and full of fireflies.",
    "The doctor said that I should rest for a few days.",
    "The bridge connects the two halves of the city.",
    "I think, therefore I am, wrote the philosopher.",
    "The dog barked twice and then ran to the gate.",
    "Reading every day is one of the best habits you can build.",
    "The sky turned orange, then pink, then deep purple.",
    "A stream never stops: it only changes the water it carries.",
    "They shared stories by the fire until the wood burned out.",
    "The model answered: \"Hello! How can I help you today?\"",
    "Lists, tables and (parentheses) are common in [technical] text; so are {braces}.",
    "Email me at hello@example.com or call +1 555 0100 after 9 am.",
]

_MODEL_BYTES: bytes | None = None  # trained once per process


def _train() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_LINES),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        # Llama's normalizer settings: text is kept verbatim (no NFKC, no whitespace collapsing),
        # only a dummy-prefix space is added at the start of a sequence.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        num_threads=1,
        minloglevel=2,  # quiet
    )
    return buf.getvalue()


def tiny_model_bytes() -> bytes:
    """The serialized sentencepiece model (trained on first use, then cached in memory)."""
    global _MODEL_BYTES
    if _MODEL_BYTES is None:
        _MODEL_BYTES = _train()
    return _MODEL_BYTES


def make_tiny_tokenizer(directory, *, with_chat_template: bool = False) -> Path:
    """Write a tiny Llama-style sentencepiece tokenizer into ``directory`` and return it.

    Files: ``tokenizer.model`` and ``tokenizer_config.json`` (``<s>``/``</s>``/``<unk>``, no
    automatic BOS/EOS beyond Llama's defaults, and ``chat_template`` = CHAT_TEMPLATE when asked).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(tiny_model_bytes())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000,
    }
    if with_chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def make_byte_level_tokenizer(directory) -> Path:
    """Write a tiny GPT-2-style byte-level BPE ``tokenizer.json`` (400 ids, ``<|endoftext|>`` = 0,
    no BOS) into ``directory`` and return it: the other family of tokenizers the runtime reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TRAINING_LINES, trainer)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}) + "\n")
    return directory

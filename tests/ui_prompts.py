"""How WebUI and ComfyUI read a prompt, reproduced from their own source for the tests to compare
common/prompt_syntax.py with: the weighting grammars, the 75-token chunking with the weights carried along, and the
emphasis arithmetic. Each function follows its UI's function statement by statement, names kept; what the UI gets
from its surroundings (its options, its tokenizer, its embedding database, its encoder) comes in as arguments.
This is a test reference, never imported by the toolkit (WebUI is AGPL-3.0, ComfyUI GPL-3.0).

Sources, read with the repository search tools:
- WebUI, AUTOMATIC1111/stable-diffusion-webui:
  modules/prompt_parser.py at 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906 (v1.6+: the schedule grammar with hires
    steps and `[a|]`, `parse_prompt_attention` with spaces allowed around a weight, `get_multicond_prompt_list`);
  modules/sd_hijack_clip.py at 5ad03e65863b0972e133c00692556752016f10c8 (`TextConditionalModel.tokenize_line`,
    `process_tokens`: the chunking and the padding ids);
  modules/textual_inversion/textual_inversion.py at 22ecb78b51f7e6f0234cbc0efbde4ee9a2dc466f
    (`EmbeddingDatabase.register_embedding_by_name`, `find_embedding_at_position`);
  modules/sd_emphasis.py at f8391b8a8ff61bf7ebcddc9b387e6c2f206ed056 (`EmphasisOriginal`, `EmphasisOriginalNoNorm`).
- ComfyUI, comfyanonymous/ComfyUI: comfy/sd1_clip.py at b55c2247654476fbc744e572ba7a834fd9378745 (the commit
  common/long_prompts.py cites: `parse_parentheses`, `token_weights`, `escape_important`, `unescape_important`,
  `SDTokenizer.tokenize_with_weights` with `_try_get_embedding`, `gen_empty_tokens`,
  `ClipTokenWeightEncoder.encode_token_weights`).
"""

from __future__ import annotations

import re
from collections import namedtuple
from types import SimpleNamespace
from typing import Callable

Tokenize = Callable[[str], list]  # text -> token ids, without start and end tokens


# ====================================================================================================== WebUI
# ---------------------------------------------------------------- modules/prompt_parser.py at 28bd8e14

schedule_grammar = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    """Each prompt's schedule, [[end_step, text], ...]: prompt editing and alternation resolved per step by WebUI's
    lark grammar (lark is WebUI's dependency, not ours: a caller skips without it). A prompt the grammar cannot
    parse is used unchanged at every step."""
    import lark

    schedule_parser = lark.Lark(schedule_grammar)

    if hires_steps is None or use_old_scheduling:
        int_offset = 0
        flt_offset = 0
        steps = base_steps
    else:
        int_offset = base_steps
        flt_offset = 1.0
        steps = hires_steps

    def collect_steps(steps, tree):
        res = [steps]

        class CollectSteps(lark.Visitor):
            def scheduled(self, tree):
                s = tree.children[-2]
                v = float(s)
                if use_old_scheduling:
                    v = v*steps if v<1 else v
                else:
                    if "." in s:
                        v = (v - flt_offset) * steps
                    else:
                        v = (v - int_offset)
                tree.children[-2] = min(steps, int(v))
                if tree.children[-2] >= 1:
                    res.append(tree.children[-2])

            def alternate(self, tree):
                res.extend(range(1, steps+1))

        CollectSteps().visit(tree)
        return sorted(set(res))

    def at_step(step, tree):
        class AtStep(lark.Transformer):
            def scheduled(self, args):
                before, after, _, when, _ = args
                yield before or () if step <= when else after
            def alternate(self, args):
                args = ["" if not arg else arg for arg in args]
                yield args[(step - 1) % len(args)]
            def start(self, args):
                def flatten(x):
                    if isinstance(x, str):
                        yield x
                    else:
                        for gen in x:
                            yield from flatten(gen)
                return ''.join(flatten(args))
            def plain(self, args):
                yield args[0].value
            def __default__(self, data, children, meta):
                for child in children:
                    yield child
        return AtStep().transform(tree)

    def get_schedule(prompt):
        try:
            tree = schedule_parser.parse(prompt)
        except lark.exceptions.LarkError:
            return [[steps, prompt]]
        return [[t, at_step(t, tree)] for t in collect_steps(steps, tree)]

    promptdict = {prompt: get_schedule(prompt) for prompt in set(prompts)}
    return [promptdict[prompt] for prompt in prompts]


def webui_is_scheduled(prompt: str, steps: int = 20) -> bool:
    """Whether WebUI encodes anything but the prompt's own text at some step: the AND split of
    `get_multicond_prompt_list` (re_AND) or a schedule other than the whole prompt throughout."""
    if re_AND.search(prompt):
        return True
    return get_learned_conditioning_prompt_schedules([prompt], steps)[0] != [[steps, prompt]]


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompts):
    """The AND split: (per prompt, [(index of its sub-prompt, weight)]), the flat list of sub-prompts, their index."""
    res_indexes = []

    prompt_indexes = {}
    prompt_flat_list = []

    for prompt in prompts:
        subprompts = re_AND.split(prompt)

        indexes = []
        for subprompt in subprompts:
            match = re_weight.search(subprompt)

            text, weight = match.groups() if match is not None else (subprompt, 1.0)

            weight = float(weight) if weight is not None else 1.0

            index = prompt_indexes.get(text, None)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index

            indexes.append((index, weight))

        res_indexes.append(indexes)

    return res_indexes, prompt_flat_list, prompt_indexes


re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text):
    """[[text, weight], ...]; a BREAK is the pair ["BREAK", -1]."""
    res = []
    round_brackets = []
    square_brackets = []

    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)

        if text.startswith('\\'):
            res.append([text[1:], 1.0])
        elif text == '(':
            round_brackets.append(len(res))
        elif text == '[':
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ')' and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == ']' and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)

    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)

    if len(res) == 0:
        res = [["", 1.0]]

    # merge runs of identical weights
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1

    return res


# ---------------------------------------------------------------- modules/textual_inversion/textual_inversion.py at 22ecb78b

Embedding = namedtuple("Embedding", ["name", "vectors"])  # what tokenize_line reads of one: its name, its vector count


class EmbeddingDatabase:
    """The part of WebUI's embedding database the chunker uses: embeddings found by their name's token ids."""

    def __init__(self, tokenize: Tokenize):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.tokenize = tokenize  # model.cond_stage_model.tokenize([name])[0]

    def register_embedding_by_name(self, embedding, name):
        ids = self.tokenize(name)
        first_id = ids[0]
        if first_id not in self.ids_lookup:
            self.ids_lookup[first_id] = []
        if name in self.word_embeddings:
            # remove old one from the lookup list
            lookup = [x for x in self.ids_lookup[first_id] if x[1].name!=name]
        else:
            lookup = self.ids_lookup[first_id]
        if embedding is not None:
            lookup += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens, offset):
        token = tokens[offset]
        possible_matches = self.ids_lookup.get(token, None)

        if possible_matches is None:
            return None, None

        for ids, embedding in possible_matches:
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)

        return None, None


# ---------------------------------------------------------------- modules/sd_hijack_clip.py at 5ad03e65


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


PromptChunkFix = namedtuple('PromptChunkFix', ['offset', 'embedding'])


class TextConditionalModel:
    """WebUI's text-encoder wrapper, as far as it lays prompts into chunks. `tokenize` is the wrapped tokenizer
    (`tokenizer(texts, truncation=False, add_special_tokens=False)` for CLIP-L; open_clip's for G, which differs only
    in HTML unescaping); `opts` WebUI's settings (emphasis, comma_padding_backtrack); id_pad 0 for SDXL's G
    (FrozenOpenCLIPEmbedder2WithCustomWords), the end id for CLIP-L."""

    def __init__(self, tokenize: Tokenize, *, comma_token: int, id_start: int, id_end: int, id_pad: int,
                 comma_padding_backtrack: int = 20, emphasis: str = "Original", embedding_db: EmbeddingDatabase | None = None):
        self.chunk_length = 75
        self.comma_token = comma_token
        self.id_start = id_start
        self.id_end = id_end
        self.id_pad = id_pad
        self.opts = SimpleNamespace(emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack)
        self.hijack = SimpleNamespace(embedding_db=embedding_db or EmbeddingDatabase(tokenize))
        self._tokenize = tokenize

    def tokenize(self, texts):
        return [self._tokenize(text) for text in texts]

    def empty_chunk(self):
        """creates an empty PromptChunk and returns it"""

        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def tokenize_line(self, line):
        """this transforms a single prompt into a list of PromptChunk objects - as many as needed to
        represent the prompt. Returns the list and the total number of tokens in the prompt."""
        opts = self.opts

        if opts.emphasis != "None":
            parsed = parse_prompt_attention(line)
        else:
            parsed = [[line, 1.0]]

        tokenized = self.tokenize([text for text, _ in parsed])

        chunks = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last=False):
            """puts current chunk into the list of results and produces the next one - empty;
            if is_last is true, tokens <end-of-text> tokens at the end won't add to token_count"""
            nonlocal token_count
            nonlocal last_comma
            nonlocal chunk

            if is_last:
                token_count += len(chunk.tokens)
            else:
                token_count += self.chunk_length

            to_add = self.chunk_length - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add

            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]

            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == 'BREAK' and weight == -1:
                next_chunk()
                continue

            position = 0
            while position < len(tokens):
                token = tokens[position]

                if token == self.comma_token:
                    last_comma = len(chunk.tokens)

                # this is when we are at the end of allotted 75 tokens for the current chunk, and the current token is not a comma. opts.comma_padding_backtrack
                # is a setting that specifies that if there is a comma nearby, the text after the comma should be moved out of this chunk and into the next.
                elif opts.comma_padding_backtrack != 0 and len(chunk.tokens) == self.chunk_length and last_comma != -1 and len(chunk.tokens) - last_comma <= opts.comma_padding_backtrack:
                    break_location = last_comma + 1

                    reloc_tokens = chunk.tokens[break_location:]
                    reloc_mults = chunk.multipliers[break_location:]

                    chunk.tokens = chunk.tokens[:break_location]
                    chunk.multipliers = chunk.multipliers[:break_location]

                    next_chunk()
                    chunk.tokens = reloc_tokens
                    chunk.multipliers = reloc_mults

                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()

                embedding, embedding_length_in_tokens = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue

                emb_len = int(embedding.vectors)
                if len(chunk.tokens) + emb_len > self.chunk_length:
                    next_chunk()

                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))

                chunk.tokens += [0] * emb_len
                chunk.multipliers += [weight] * emb_len
                position += embedding_length_in_tokens

        if chunk.tokens or not chunks:
            next_chunk(is_last=True)

        return chunks, token_count

    def process_tokens_ids(self, remade_batch_tokens):
        """The ids `process_tokens` hands the encoder: everything after a chunk's first end id becomes id_pad
        ("this is for SD2: SD1 uses the same token for padding and end of text, while SD2 uses different ones")."""
        tokens = [list(x) for x in remade_batch_tokens]

        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos][index+1:len(tokens[batch_pos])] = [self.id_pad] * (len(tokens[batch_pos]) - index - 1)

        return tokens


# ---------------------------------------------------------------- modules/sd_emphasis.py at f8391b8a


class Emphasis:
    """Emphasis class decides how to death with (emphasized:1.1) text in prompts"""

    name: str = "Base"

    def after_transformers(self):
        pass


class EmphasisOriginal(Emphasis):
    name = "Original"

    def after_transformers(self):
        original_mean = self.z.mean()
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)

        # restoring original mean is likely not correct, but it seems to work well to prevent artifacts that happen otherwise
        new_mean = self.z.mean()
        self.z = self.z * (original_mean / new_mean)


class EmphasisOriginalNoNorm(EmphasisOriginal):
    name = "No norm"

    def after_transformers(self):
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)


def webui_emphasis(emphasis_class, z, batch_multipliers):
    """process_tokens' use of an emphasis: multipliers made a tensor with torch.asarray (Python floats: float32),
    z the encoder's output for one chunk position of every text in the call (B, 77, C)."""
    import torch

    emphasis = emphasis_class()
    emphasis.multipliers = torch.asarray(batch_multipliers).to(z.device)
    emphasis.z = z
    emphasis.after_transformers()
    return emphasis.z


# ====================================================================================================== ComfyUI
# ---------------------------------------------------------------- comfy/sd1_clip.py at b55c2247


def gen_empty_tokens(special_tokens, length):
    start_token = special_tokens.get("start", None)
    end_token = special_tokens.get("end", None)
    pad_token = special_tokens.get("pad")
    output = []
    if start_token is not None:
        output.append(start_token)
    if end_token is not None:
        output.append(end_token)
    output += [pad_token] * (length - len(output))
    return output


class ClipTokenWeightEncoder:
    """`encode(list of id lists) -> (out (n, 77, C), pooled or None)` is the encoder (SDClipModel.forward: float32
    hidden states of the chosen layer); special_tokens its start, end and pad ids."""

    def __init__(self, encode, special_tokens):
        self.encode = encode
        self.special_tokens = special_tokens

    def encode_token_weights(self, token_weight_pairs):
        import torch

        to_encode = list()
        max_token_len = 0
        has_weights = False
        for x in token_weight_pairs:
            tokens = list(map(lambda a: a[0], x))
            max_token_len = max(len(tokens), max_token_len)
            has_weights = has_weights or not all(map(lambda a: a[1] == 1.0, x))
            to_encode.append(tokens)

        sections = len(to_encode)
        if has_weights or sections == 0:
            to_encode.append(gen_empty_tokens(self.special_tokens, max_token_len))

        o = self.encode(to_encode)
        out, pooled = o[:2]

        if pooled is not None:
            first_pooled = pooled[0:1]
        else:
            first_pooled = pooled

        output = []
        for k in range(0, sections):
            z = out[k:k+1]
            if has_weights:
                z_empty = out[-1]
                for i in range(len(z)):
                    for j in range(len(z[i])):
                        weight = token_weight_pairs[k][j][1]
                        if weight != 1.0:
                            z[i][j] = (z[i][j] - z_empty[j]) * weight + z_empty[j]
            output.append(z)

        if (len(output) == 0):
            r = (out[-1:], first_pooled)
        else:
            r = (torch.cat(output, dim=-2), first_pooled)
        return r


def parse_parentheses(string):
    result = []
    current_item = ""
    nesting_level = 0
    for char in string:
        if char == "(":
            if nesting_level == 0:
                if current_item:
                    result.append(current_item)
                    current_item = "("
                else:
                    current_item = "("
            else:
                current_item += char
            nesting_level += 1
        elif char == ")":
            nesting_level -= 1
            if nesting_level == 0:
                result.append(current_item + ")")
                current_item = ""
            else:
                current_item += char
        else:
            current_item += char
    if current_item:
        result.append(current_item)
    return result


def token_weights(string, current_weight):
    a = parse_parentheses(string)
    out = []
    for x in a:
        weight = current_weight
        if len(x) >= 2 and x[-1] == ')' and x[0] == '(':
            x = x[1:-1]
            xx = x.rfind(":")
            weight *= 1.1
            if xx > 0:
                try:
                    weight = float(x[xx+1:])
                    x = x[:xx]
                except:  # noqa: E722 (as in the source)
                    pass
            out += token_weights(x, weight)
        else:
            out += [(x, current_weight)]
    return out


def escape_important(text):
    text = text.replace("\\)", "\0\1")
    text = text.replace("\\(", "\0\2")
    return text


def unescape_important(text):
    text = text.replace("\0\1", ")")
    text = text.replace("\0\2", "(")
    return text


def comfyui_parse(text):
    """The weighted segments tokenize_with_weights tokenises: token_weights of the escaped text, each unescaped."""
    return [(unescape_important(segment), weight) for segment, weight in token_weights(escape_important(text), 1.0)]


class SDTokenizer:
    """ComfyUI's tokenizer as far as it lays weighted tokens into chunks. `tokenize(word)` stands for
    `self.tokenizer(word)["input_ids"][self.tokens_start:-1]`, CLIP's ids without start and end; `embeddings` for
    the embedding directory: {file name: the ids standing for its vectors} (None: no directory, `embedding:` is text).
    SDXLClipGTokenizer is this with pad_with_end=False (pad 0)."""

    def __init__(self, tokenize: Tokenize, *, start_token: int, end_token: int, pad_with_end: bool = True,
                 embeddings: dict | None = None, max_length: int = 77):
        self.tokenize = tokenize
        self.max_length = max_length
        self.min_length = None
        self.start_token = start_token
        self.end_token = end_token
        self.pad_token = end_token if pad_with_end else 0
        self.pad_to_max_length = True
        self.embedding_directory = embeddings
        self.max_word_length = 8
        self.embedding_identifier = "embedding:"

    def load_embed(self, embedding_name):
        """load_embed's search of the directory: the name as a file, else the name with .safetensors, .pt or .bin."""
        if embedding_name in self.embedding_directory:
            return self.embedding_directory[embedding_name]
        for x in ['.safetensors', '.pt', '.bin']:
            if embedding_name + x in self.embedding_directory:
                return self.embedding_directory[embedding_name + x]
        return None

    def _try_get_embedding(self, embedding_name:str):
        '''
        Takes a potential embedding name and tries to retrieve it.
        Returns a Tuple consisting of the embedding and any leftover string, embedding can be None.
        '''
        split_embed = embedding_name.split()
        embedding_name = split_embed[0]
        leftover = ' '.join(split_embed[1:])
        embed = self.load_embed(embedding_name)
        if embed is None:
            stripped = embedding_name.strip(',')
            if len(stripped) < len(embedding_name):
                embed = self.load_embed(stripped)
                return (embed, "{} {}".format(embedding_name[len(stripped):], leftover))
        return (embed, leftover)

    def token_groups(self, text: str):
        """The "tokenize words" half of tokenize_with_weights: one [(token, weight), ...] group per weighted segment,
        split before each `embedding:` that follows a space or newline, an embedding a group of its own."""
        text = escape_important(text)
        parsed_weights = token_weights(text, 1.0)

        # tokenize words
        tokens = []
        for weighted_segment, weight in parsed_weights:
            to_tokenize = unescape_important(weighted_segment)
            split = re.split(' {0}|\n{0}'.format(self.embedding_identifier), to_tokenize)
            to_tokenize = [split[0]]
            for i in range(1, len(split)):
                to_tokenize.append("{}{}".format(self.embedding_identifier, split[i]))

            to_tokenize = [x for x in to_tokenize if x != ""]
            for word in to_tokenize:
                # if we find an embedding, deal with the embedding
                if word.startswith(self.embedding_identifier) and self.embedding_directory is not None:
                    embedding_name = word[len(self.embedding_identifier):].strip('\n')
                    embed, leftover = self._try_get_embedding(embedding_name)
                    if embed is None:
                        pass  # logging.warning(f"warning, embedding:{embedding_name} does not exist, ignoring")
                    else:
                        tokens.append([(vector, weight) for vector in embed])
                    #if we accidentally have leftover text, continue parsing using leftover, else move on to next word
                    if leftover != "":
                        word = leftover
                    else:
                        continue
                #parse word
                tokens.append([(t, weight) for t in self.tokenize(word)])
        return tokens

    def tokenize_with_weights(self, text:str, return_word_ids=False):
        '''
        Takes a prompt and converts it to a list of (token, weight, word id) elements.
        Returned list has the dimensions NxM where M is the input size of CLIP
        '''
        return self.reshape(self.token_groups(text), return_word_ids)

    def reshape(self, tokens, return_word_ids=False):
        """The "reshape token array to CLIP input size" loop of tokenize_with_weights, on token groups."""
        #reshape token array to CLIP input size
        batched_tokens = []
        batch = []
        if self.start_token is not None:
            batch.append((self.start_token, 1.0, 0))
        batched_tokens.append(batch)
        for i, t_group in enumerate(tokens):
            #determine if we're going to try and keep the tokens in a single batch
            is_large = len(t_group) >= self.max_word_length
            if self.end_token is not None:
                has_end_token = 1
            else:
                has_end_token = 0

            while len(t_group) > 0:
                if len(t_group) + len(batch) > self.max_length - has_end_token:
                    remaining_length = self.max_length - len(batch) - has_end_token
                    #break word in two and add end token
                    if is_large:
                        batch.extend([(t,w,i+1) for t,w in t_group[:remaining_length]])
                        if self.end_token is not None:
                            batch.append((self.end_token, 1.0, 0))
                        t_group = t_group[remaining_length:]
                    #add end token and pad
                    else:
                        if self.end_token is not None:
                            batch.append((self.end_token, 1.0, 0))
                        if self.pad_to_max_length:
                            batch.extend([(self.pad_token, 1.0, 0)] * (remaining_length))
                    #start new batch
                    batch = []
                    if self.start_token is not None:
                        batch.append((self.start_token, 1.0, 0))
                    batched_tokens.append(batch)
                else:
                    batch.extend([(t,w,i+1) for t,w in t_group])
                    t_group = []

        #fill last batch
        if self.end_token is not None:
            batch.append((self.end_token, 1.0, 0))
        if self.pad_to_max_length:
            batch.extend([(self.pad_token, 1.0, 0)] * (self.max_length - len(batch)))
        if self.min_length is not None and len(batch) < self.min_length:
            batch.extend([(self.pad_token, 1.0, 0)] * (self.min_length - len(batch)))

        if not return_word_ids:
            batched_tokens = [[(t, w) for t, w,_ in x] for x in batched_tokens]

        return batched_tokens

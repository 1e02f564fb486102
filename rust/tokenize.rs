//! Tokenizing canonical strings exactly as a model sees them in its answer (docs/method.md §5).
//!
//! A Hugging Face tokenizer splits added tokens out first and tokenizes the text between them
//! independently, so the ids of `chat_prefix + value` after the prefix depend only on the prefix's
//! tail starting at its last added token (the *context*, e.g. `<|im_start|>assistant\n`).
//! Encoding `context + value` instead of the whole prefix gives the same ids at a fraction of the
//! cost; the Python side checks this equality against full encodings.
//!
//! Encoding runs the tokenizer's own stages (added tokens, normalizer, pre-tokenizer, model) but
//! memoizes both the pre-tokenizer's split layout per value shape and the model's output per
//! piece (see `PieceCache`), so a space of 16384 numbers costs a few dozen real tokenizer calls.

/// Byte ranges of a value's pre-token pieces; `None`: encode such values in full.
type Plan = Option<Vec<(usize, usize)>>;

/// Memo of one encoding pass: model ids per pre-token piece, and the piece layout per value
/// *shape* (the value with every digit replaced by 0). Pre-tokenizers split on character
/// classes, and all digits share one class, so values of one shape split at the same offsets;
/// the tests check this against full encodings on real tokenizers.
#[derive(Default)]
struct PieceCache {
    pieces: HashMap<String, Vec<u32>>,
    plans: HashMap<Vec<u8>, Plan>,
}

use std::collections::HashMap;

use rayon::prelude::*;
use tokenizers::{
    models::ModelWrapper, Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    Tokenizer,
};

use crate::error::{invalid, CoreError, Result};

pub struct CompletionTokenizer {
    tokenizer: Tokenizer,
    end_id: u32,
    /// Ids of '0'..='9' when the model provably encodes any run of digits digit by digit.
    digit_ids: Option<[u32; 10]>,
}

/// The completion tokenizer bound to one chat-prefix context.
pub struct ContextEncoder<'a> {
    tokenizer: &'a CompletionTokenizer,
    context: &'a str,
    context_ids: Vec<u32>,
}

impl CompletionTokenizer {
    /// `tokenizer_json`: a fast tokenizer's serialized JSON; `end_id`: the terminator appended to
    /// every completion.
    pub fn new(tokenizer_json: &str, end_id: u32) -> Result<Self> {
        let tokenizer: Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| CoreError::Tokenizer(format!("cannot load tokenizer JSON: {e}")))?;
        if end_id as usize >= tokenizer.get_vocab_size(true) {
            return Err(invalid(
                "end_token_id",
                format!(
                    "{end_id} is outside the vocabulary of size {}",
                    tokenizer.get_vocab_size(true)
                ),
            ));
        }
        let digit_ids = single_digit_ids(&tokenizer);
        Ok(Self {
            tokenizer,
            end_id,
            digit_ids,
        })
    }

    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    /// Binds the chat prefix's tail (see module docs) that precedes every value.
    pub fn with_context<'a>(&'a self, context: &'a str) -> Result<ContextEncoder<'a>> {
        let context_ids = if context.is_empty() {
            Vec::new()
        } else {
            self.encode(context, &mut PieceCache::default())?
        };
        Ok(ContextEncoder {
            tokenizer: self,
            context,
            context_ids,
        })
    }

    /// `Tokenizer::encode(text, add_special_tokens=false)` ids, stage by stage, with `cache`.
    fn encode(&self, text: &str, cache: &mut PieceCache) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for (piece, _, added) in self
            .pieces(text)?
            .get_splits(OffsetReferential::Original, OffsetType::None)
        {
            match added {
                Some(tokens) => ids.extend(tokens.iter().map(|tok| tok.id)),
                None => ids.extend_from_slice(self.model_ids(piece, cache)?),
            }
        }
        Ok(ids)
    }

    /// Added tokens split out, the rest normalized and pre-tokenized: the stages before the model.
    fn pieces(&self, text: &str) -> Result<PreTokenizedString> {
        let t = &self.tokenizer;
        let mut pieces = t
            .get_added_vocabulary()
            .extract_and_normalize(t.get_normalizer(), text);
        if let Some(pre) = t.get_pre_tokenizer() {
            pre.pre_tokenize(&mut pieces)
                .map_err(|e| CoreError::Tokenizer(format!("cannot pre-tokenize {text:?}: {e}")))?;
        }
        Ok(pieces)
    }

    /// The model's ids for one pre-token piece, memoized.
    fn model_ids<'c>(&self, piece: &str, cache: &'c mut PieceCache) -> Result<&'c [u32]> {
        if !cache.pieces.contains_key(piece) {
            let ids = self
                .tokenizer
                .get_model()
                .tokenize(piece)
                .map_err(|e| CoreError::Tokenizer(format!("cannot tokenize {piece:?}: {e}")))?
                .iter()
                .map(|tok| tok.id)
                .collect();
            cache.pieces.insert(piece.to_owned(), ids);
        }
        Ok(&cache.pieces[piece])
    }
}

/// The ids of the ten digits if the model is a BPE without subword affixes whose vocabulary has
/// every single digit and no token of two or more digits: merges only ever produce vocabulary
/// tokens, so such a model cannot merge digits and encodes a digit run digit by digit.
fn single_digit_ids(tokenizer: &Tokenizer) -> Option<[u32; 10]> {
    let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
        return None;
    };
    // Some tokenizer JSONs spell "no affix" as an empty string.
    let has_affix = |affix: &Option<String>| affix.as_deref().is_some_and(|a| !a.is_empty());
    if has_affix(&bpe.continuing_subword_prefix) || has_affix(&bpe.end_of_word_suffix) {
        return None;
    }
    let vocab = bpe.get_vocab();
    let multi_digit = vocab
        .keys()
        .any(|tok| tok.len() > 1 && tok.bytes().all(|b| b.is_ascii_digit()));
    if multi_digit {
        return None;
    }
    let mut ids = [0u32; 10];
    for (digit, id) in ids.iter_mut().enumerate() {
        *id = *vocab.get(&digit.to_string())?;
    }
    Some(ids)
}

impl ContextEncoder<'_> {
    /// Completion ids of one value, terminator included.
    fn encode_value(&self, value: &str, cache: &mut PieceCache) -> Result<Vec<u32>> {
        let shape: Vec<u8> = value
            .bytes()
            .map(|b| if b.is_ascii_digit() { b'0' } else { b })
            .collect();
        let plan = match cache.plans.get(&shape) {
            Some(plan) => plan.clone(),
            None => {
                let plan = self.plan(value, cache)?;
                cache.plans.insert(shape, plan.clone());
                plan
            }
        };
        let mut ids = match plan {
            Some(ranges) => {
                let mut ids = Vec::with_capacity(ranges.len() + 1);
                for (start, end) in ranges {
                    let piece = &value[start..end];
                    match (
                        self.tokenizer.digit_ids,
                        piece.bytes().all(|b| b.is_ascii_digit()),
                    ) {
                        // Digit runs have up to 10^k spellings: memoizing them would miss.
                        (Some(digits), true) => {
                            ids.extend(piece.bytes().map(|b| digits[usize::from(b - b'0')]))
                        }
                        _ => ids.extend_from_slice(self.tokenizer.model_ids(piece, cache)?),
                    }
                }
                ids
            }
            None => self.encode_in_full(value, cache)?,
        };
        if ids.is_empty() {
            return Err(invalid(
                "values",
                format!("value {value:?} tokenizes to nothing"),
            ));
        }
        ids.push(self.tokenizer.end_id);
        Ok(ids)
    }

    /// Ids after the context of `context + value`, through every stage of the tokenizer.
    fn encode_in_full(&self, value: &str, cache: &mut PieceCache) -> Result<Vec<u32>> {
        let text = format!("{}{value}", self.context);
        let mut ids = Vec::new();
        for (piece, _, added) in self
            .tokenizer
            .pieces(&text)?
            .get_splits(OffsetReferential::Original, OffsetType::None)
        {
            match added {
                Some(tokens) => ids.extend(tokens.iter().map(|tok| tok.id)),
                None => ids.extend_from_slice(self.tokenizer.model_ids(piece, cache)?),
            }
        }
        if !ids.starts_with(&self.context_ids) {
            return Err(CoreError::Tokenizer(format!(
                "the chat prefix's last tokens merge with the value {value:?}; its completion tokens are ambiguous"
            )));
        }
        ids.drain(..self.context_ids.len());
        Ok(ids)
    }

    /// How values shaped like `value` split into pre-token pieces: byte ranges within the value,
    /// or `None` when the pieces cannot be reused (a piece straddles the context boundary or the
    /// normalizer rewrites the value's characters).
    fn plan(&self, value: &str, cache: &mut PieceCache) -> Result<Plan> {
        let text = format!("{}{value}", self.context);
        let base = self.context.len();
        let pieces = self.tokenizer.pieces(&text)?;
        let mut context_ids = Vec::new();
        let mut ranges = Vec::new();
        for (piece, (start, end), added) in
            pieces.get_splits(OffsetReferential::Original, OffsetType::Byte)
        {
            if end <= base {
                match added {
                    Some(tokens) => context_ids.extend(tokens.iter().map(|tok| tok.id)),
                    None => context_ids.extend_from_slice(self.tokenizer.model_ids(piece, cache)?),
                }
            } else if start >= base && added.is_none() && text.get(start..end) == Some(piece) {
                ranges.push((start - base, end - base));
            } else {
                return Ok(None);
            }
        }
        Ok((context_ids == self.context_ids).then_some(ranges))
    }

    /// Completion ids of many values, flattened: `ids[offsets[i]..offsets[i + 1]]` is value `i`.
    pub fn encode_values<'a, I>(&self, values: I) -> Result<(Vec<usize>, Vec<u32>)>
    where
        I: IntoIterator<Item = &'a str>,
    {
        let mut offsets = vec![0usize];
        let mut flat = Vec::new();
        let mut cache = PieceCache::default();
        for value in values {
            flat.extend(self.encode_value(value, &mut cache)?);
            offsets.push(flat.len());
        }
        Ok((offsets, flat))
    }

    /// Like [`encode_values`] but splits the work over the rayon pool; for one big space.
    pub fn encode_values_par(&self, values: &[&str]) -> Result<(Vec<usize>, Vec<u32>)> {
        let chunks: Vec<Vec<Vec<u32>>> = values
            .par_chunks(1024)
            .map(|chunk| {
                let mut cache = PieceCache::default();
                chunk
                    .iter()
                    .map(|v| self.encode_value(v, &mut cache))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let mut offsets = Vec::with_capacity(values.len() + 1);
        offsets.push(0);
        let mut flat = Vec::new();
        for ids in chunks.into_iter().flatten() {
            flat.extend_from_slice(&ids);
            offsets.push(flat.len());
        }
        Ok((offsets, flat))
    }
}

//! Chat prompts: the model's own Jinja `chat_template` rendered with minijinja, or a
//! documented fallback for models that ship none (Gemma 3 base):
//! - vocabularies with `<start_of_turn>` get Gemma's turn format;
//! - vocabularies with `<|im_start|>` get ChatML;
//! - anything else gets plain `User: …` / `Assistant:` lines.

use crate::error::{LmError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    Gemma,
    ChatMl,
    Plain,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: Option<String>,
    fallback: Fallback,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// `source` is the model's template, if any; `has_token` tells which markers exist.
    pub fn new(
        source: Option<String>,
        bos: String,
        eos: String,
        has_token: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let fallback = if has_token("<start_of_turn>") {
            Fallback::Gemma
        } else if has_token("<|im_start|>") {
            Fallback::ChatMl
        } else {
            Fallback::Plain
        };
        let t = Self {
            source,
            fallback,
            bos,
            eos,
        };
        // Fail at load, not at the first request, on a template minijinja cannot parse.
        t.render(&[ChatMessage::user("hi")], true)?;
        Ok(t)
    }

    /// Whether the model's own template is used (false: the fallback).
    pub fn is_native(&self) -> bool {
        self.source.is_some()
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(LmError::InvalidInput(
                "a chat needs at least one message".into(),
            ));
        }
        match &self.source {
            Some(src) => self.render_jinja(src, messages, add_generation_prompt),
            None => Ok(self.render_fallback(messages, add_generation_prompt)),
        }
    }

    fn render_jinja(
        &self,
        src: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // The template comes with the model file, from anywhere: bound its work (loops,
        // allocations) and what it writes, so a hostile one is an error, not a hang.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_DEPTH);
        env.add_template("chat", src)
            .map_err(|e| LmError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| LmError::ChatTemplate(e.to_string()))?;
        let input: usize = messages.iter().map(|m| m.content.len()).sum();
        let mut out = Bounded {
            text: Vec::new(),
            limit: TEMPLATE_OUTPUT_BASE + TEMPLATE_OUTPUT_PER_INPUT * input,
        };
        tmpl.render_captured_to(
            minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            },
            &mut out,
        )
        .map_err(|e| LmError::ChatTemplate(e.to_string()))?;
        String::from_utf8(out.text)
            .map_err(|_| LmError::ChatTemplate("the template wrote invalid UTF-8".into()))
    }

    fn render_fallback(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        for m in messages {
            match self.fallback {
                Fallback::Gemma => {
                    // Gemma has no system role: its own template folds it into the first turn.
                    let role = if m.role == "assistant" {
                        "model"
                    } else {
                        "user"
                    };
                    out.push_str(&format!(
                        "<start_of_turn>{role}\n{}<end_of_turn>\n",
                        m.content
                    ));
                }
                Fallback::ChatMl => out.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                )),
                Fallback::Plain => {
                    let role = match m.role.as_str() {
                        "assistant" => "Assistant",
                        "system" => "System",
                        _ => "User",
                    };
                    out.push_str(&format!("{role}: {}\n", m.content));
                }
            }
        }
        if add_generation_prompt {
            out.push_str(match self.fallback {
                Fallback::Gemma => "<start_of_turn>model\n",
                Fallback::ChatMl => "<|im_start|>assistant\n",
                Fallback::Plain => "Assistant:",
            });
        }
        out
    }
}

/// minijinja's fuel for one render: every instruction and allocated byte costs some. Real
/// templates use tens of thousands for a long chat; this stops a runaway one in well under a
/// second.
const TEMPLATE_FUEL: u64 = 20_000_000;
/// Nesting (macros, includes, expressions) a render may reach: real templates nest a few
/// levels; minijinja's default of 500 could overflow a worker thread's stack first.
const TEMPLATE_DEPTH: usize = 64;
/// What a render may write: real templates add a few hundred bytes of markup per message, so
/// a fixed allowance plus a multiple of the messages' own text.
const TEMPLATE_OUTPUT_BASE: usize = 64 * 1024;
const TEMPLATE_OUTPUT_PER_INPUT: usize = 4;

/// A sink that refuses to grow past its limit.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            return Err(std::io::Error::other(format!(
                "the rendered prompt would exceed {} bytes",
                self.limit
            )));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_a_native_template() {
        let t =
            ChatTemplate::new(Some(CHATML.into()), "<s>".into(), "</s>".into(), |_| true).unwrap();
        let s = t.render(&[ChatMessage::user("Hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn falls_back_per_vocabulary() {
        let gemma = ChatTemplate::new(None, "<bos>".into(), "<eos>".into(), |t| {
            t == "<start_of_turn>"
        })
        .unwrap();
        assert_eq!(
            gemma.render(&[ChatMessage::user("Hi")], true).unwrap(),
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        let plain = ChatTemplate::new(None, String::new(), String::new(), |_| false).unwrap();
        assert_eq!(
            plain.render(&[ChatMessage::user("Hi")], true).unwrap(),
            "User: Hi\nAssistant:"
        );
    }

    #[test]
    fn template_errors_are_typed() {
        let bad = ChatTemplate::new(
            Some("{% for %}".into()),
            String::new(),
            String::new(),
            |_| false,
        );
        assert!(matches!(bad, Err(LmError::ChatTemplate(_))));
        let raising = "{{ raise_exception('roles must alternate') }}";
        let e = ChatTemplate::new(Some(raising.into()), String::new(), String::new(), |_| {
            false
        })
        .unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
        let t = ChatTemplate::new(None, String::new(), String::new(), |_| false).unwrap();
        assert!(t.render(&[], true).is_err());
    }

    #[test]
    fn the_bounds_leave_room_for_long_real_chats() {
        let t =
            ChatTemplate::new(Some(CHATML.into()), "<s>".into(), "</s>".into(), |_| true).unwrap();
        let messages: Vec<ChatMessage> = (0..512)
            .map(|i| ChatMessage::new(["user", "assistant"][i % 2], "word ".repeat(800)))
            .collect();
        let s = t.render(&messages, true).unwrap();
        assert!(s.len() > 512 * 4000, "{}", s.len());
    }

    #[test]
    fn hostile_templates_are_errors_not_hangs() {
        for (name, src) in [
            (
                "nested loops",
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            ),
            ("a huge string", "{{ 'x' * 1000000000 }}"),
            (
                "a long output",
                "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}",
            ),
            (
                "recursion",
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            ),
        ] {
            let started = std::time::Instant::now();
            let e = ChatTemplate::new(Some(src.into()), String::new(), String::new(), |_| false)
                .err()
                .unwrap_or_else(|| panic!("{name} rendered"));
            assert!(matches!(e, LmError::ChatTemplate(_)), "{name}: {e:?}");
            eprintln!("{name}: {e} after {:?}", started.elapsed());
        }
    }
}

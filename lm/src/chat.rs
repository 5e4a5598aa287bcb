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
        env.add_template("chat", src)
            .map_err(|e| LmError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| LmError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| LmError::ChatTemplate(e.to_string()))
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
}

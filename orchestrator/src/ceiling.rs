//! How much one tenant may ask for: the dream policy's costly knobs and the sessions it holds.
//! `[ceiling]` applies to every caller; `[tenant_ceilings.<tenant>]` replaces it for one
//! tenant. Unset: no ceiling beyond the policy's own ranges.

use crate::auth::Caller;
use crate::policy::TurnPolicy;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tonic::Status;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ceiling {
    pub bursts: Option<u32>,
    pub steps: Option<u32>,
    pub reply_tokens: Option<u32>,
    pub max_attempts: Option<u32>,
    /// Sessions one tenant may hold in the store.
    pub sessions: Option<usize>,
}

impl Ceiling {
    /// The ceiling `caller` is under.
    pub fn of<'a>(
        caller: &Caller,
        all: &'a Ceiling,
        tenants: &'a HashMap<String, Ceiling>,
    ) -> &'a Ceiling {
        match caller {
            Caller::Tenant(t) => tenants.get(t).unwrap_or(all),
            Caller::Anyone => all,
        }
    }

    /// INVALID_ARGUMENT naming the first knob of `p` above the ceiling.
    pub fn check(&self, p: &TurnPolicy) -> Result<(), Status> {
        for (field, asked, most) in [
            ("bursts", p.bursts, self.bursts),
            ("steps", p.steps, self.steps),
            ("reply_tokens", p.reply_tokens, self.reply_tokens),
            ("max_attempts", p.max_attempts, self.max_attempts),
        ] {
            if let Some(most) = most.filter(|&m| asked > m) {
                return Err(Status::invalid_argument(format!(
                    "policy.{field} = {asked} is above this orchestrator's ceiling of {most} for you"
                )));
            }
        }
        Ok(())
    }

    /// RESOURCE_EXHAUSTED when a caller holding `held` sessions may not create another.
    pub fn check_sessions(&self, held: usize) -> Result<(), Status> {
        match self.sessions {
            Some(most) if held >= most => Err(Status::resource_exhausted(format!(
                "you hold {held} sessions, the most this orchestrator allows you: delete one first"
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_is_held_to_its_own_ceiling_or_else_the_common_one() {
        let all = Ceiling {
            steps: Some(8),
            sessions: Some(2),
            ..Default::default()
        };
        let tenants = HashMap::from([(
            "big".to_string(),
            Ceiling {
                steps: Some(64),
                ..Default::default()
            },
        )]);
        let asks = TurnPolicy {
            steps: 16,
            ..Default::default()
        };
        let small = Ceiling::of(&Caller::Tenant("small".into()), &all, &tenants);
        let e = small.check(&asks).unwrap_err();
        assert!(e.message().contains("policy.steps = 16") && e.message().contains("8"));
        assert!(Ceiling::of(&Caller::Tenant("big".into()), &all, &tenants)
            .check(&asks)
            .is_ok());
        assert!(small.check_sessions(1).is_ok());
        assert_eq!(
            small.check_sessions(2).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }
}

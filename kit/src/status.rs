//! The runtime's errors as gRPC statuses. The caller's mistakes are INVALID_ARGUMENT or
//! OUT_OF_RANGE; the server's own faults are UNAVAILABLE (its device) or INTERNAL, which the
//! orchestrator treats as a failed replica and fails over.

use lm::LmError;
use tonic::Status;

pub fn status_of(e: &LmError) -> Status {
    match e {
        LmError::InvalidInput(m) => Status::invalid_argument(m.clone()),
        LmError::InvalidParam(p) => Status::invalid_argument(p.to_string()),
        LmError::Tokenizer(_) | LmError::ChatTemplate(_) => Status::invalid_argument(e.to_string()),
        LmError::ContextOverflow { .. } => Status::out_of_range(e.to_string()),
        LmError::Device(_) => Status::unavailable(e.to_string()),
        LmError::Cancelled => Status::cancelled(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn the_callers_mistakes_and_the_servers_faults_get_different_codes() {
        let param = LmError::InvalidParam(lm::InvalidParam::new("top_p", "must be in (0, 1]"));
        assert_eq!(status_of(&param).code(), Code::InvalidArgument);
        assert_eq!(status_of(&param).message(), "top_p must be in (0, 1]");
        let long = LmError::ContextOverflow {
            needed: 9,
            limit: 8,
        };
        assert_eq!(status_of(&long).code(), Code::OutOfRange);
        assert_eq!(
            status_of(&LmError::Device("lost".into())).code(),
            Code::Unavailable
        );
        assert_eq!(
            status_of(&LmError::Layout("q has 3 columns".into())).code(),
            Code::Internal
        );
    }
}

//! The gRPC contracts of the muse, the majordomo and the orchestrator (tonic + prost).

pub mod muse {
    pub mod v1 {
        tonic::include_proto!("muse.v1");
    }
}

pub mod majordomo {
    pub mod v1 {
        tonic::include_proto!("majordomo.v1");
    }
}

pub mod orchestrator {
    pub mod v1 {
        tonic::include_proto!("orchestrator.v1");
    }
}

pub mod muse_session;

/// Encoded descriptors of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");

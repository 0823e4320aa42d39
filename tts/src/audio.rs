//! Audio encoding: model output (f32) to 16-bit PCM, resampling, WAV containers, RMS.

use serde::{Deserialize, Serialize};

/// Output container of a render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// RIFF/WAVE, 16-bit mono (`audio/wav`).
    #[default]
    Wav,
    /// Raw little-endian 16-bit mono samples (`audio/L16`).
    PcmS16le,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "wav" => Some(Format::Wav),
            "pcm_s16le" => Some(Format::PcmS16le),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Wav => "wav",
            Format::PcmS16le => "pcm_s16le",
        }
    }

    /// The artifact's file name.
    pub fn artifact_name(self) -> &'static str {
        match self {
            Format::Wav => "audio.wav",
            Format::PcmS16le => "audio.pcm",
        }
    }

    pub fn content_type(self, sample_rate: u32) -> String {
        match self {
            Format::Wav => "audio/wav".into(),
            Format::PcmS16le => format!("audio/L16; rate={sample_rate}; channels=1"),
        }
    }

    /// Encode samples in this format.
    pub fn encode(self, samples: &[i16], sample_rate: u32) -> Vec<u8> {
        match self {
            Format::Wav => wav_bytes(samples, sample_rate),
            Format::PcmS16le => pcm_bytes(samples),
        }
    }
}

/// Piper's conversion: scale the chunk so its peak reaches full scale (a peak under 0.01 is
/// treated as 0.01, so near-silence is not amplified into noise), clip, truncate to i16.
pub fn float_to_i16(audio: &[f32]) -> Vec<i16> {
    let peak = audio.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(0.01);
    let scale = 32767.0 / peak;
    audio
        .iter()
        .map(|x| (x * scale).clamp(-32767.0, 32767.0) as i16)
        .collect()
}

/// Linear-interpolation resampling (mono). Returns the input when the rates match.
pub fn resample(samples: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to || samples.is_empty() {
        return samples.to_vec();
    }
    let out_len = ((samples.len() as u64 * to as u64) / from as u64).max(1) as usize;
    let step = from as f64 / to as f64;
    (0..out_len)
        .map(|i| {
            let pos = i as f64 * step;
            let i0 = pos.floor() as usize;
            let frac = pos - i0 as f64;
            let a = samples[i0.min(samples.len() - 1)] as f64;
            let b = samples[(i0 + 1).min(samples.len() - 1)] as f64;
            (a + (b - a) * frac).round() as i16
        })
        .collect()
}

/// Raw little-endian samples.
pub fn pcm_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// A 44-byte canonical WAV header for `data_len` bytes of 16-bit mono PCM.
pub fn wav_header(data_len: u32, sample_rate: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    let channels: u16 = 1;
    let bits: u16 = 16;
    let block_align = channels * bits / 8;
    let byte_rate = sample_rate * block_align as u32;
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(36 + data_len).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    h[22..24].copy_from_slice(&channels.to_le_bytes());
    h[24..28].copy_from_slice(&sample_rate.to_le_bytes());
    h[28..32].copy_from_slice(&byte_rate.to_le_bytes());
    h[32..34].copy_from_slice(&block_align.to_le_bytes());
    h[34..36].copy_from_slice(&bits.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_len.to_le_bytes());
    h
}

/// A complete WAV file.
pub fn wav_bytes(samples: &[i16], sample_rate: u32) -> Vec<u8> {
    let data = pcm_bytes(samples);
    let mut out = Vec::with_capacity(44 + data.len());
    out.extend_from_slice(&wav_header(data.len() as u32, sample_rate));
    out.extend_from_slice(&data);
    out
}

/// A parsed WAV file (16-bit mono/stereo PCM only).
#[derive(Debug, Clone)]
pub struct Wav {
    pub sample_rate: u32,
    pub channels: u16,
    pub samples: Vec<i16>,
}

impl Wav {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / self.channels.max(1) as f64 / self.sample_rate.max(1) as f64
    }
}

/// Read a 16-bit PCM WAV file (walks the chunks, so extra chunks before `data` are fine).
pub fn parse_wav(bytes: &[u8]) -> Option<Wav> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return None;
    }
    let mut pos = 12;
    let mut fmt: Option<(u16, u32, u16)> = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().ok()?) as usize;
        let body = bytes.get(pos + 8..(pos + 8 + len).min(bytes.len()))?;
        match id {
            b"fmt " if body.len() >= 16 => {
                let format = u16::from_le_bytes([body[0], body[1]]);
                let channels = u16::from_le_bytes([body[2], body[3]]);
                let rate = u32::from_le_bytes(body[4..8].try_into().ok()?);
                let bits = u16::from_le_bytes([body[14], body[15]]);
                if format != 1 || bits != 16 {
                    return None;
                }
                fmt = Some((channels, rate, bits));
            }
            b"data" => {
                let (channels, sample_rate, _) = fmt?;
                let samples = body
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect();
                return Some(Wav {
                    sample_rate,
                    channels,
                    samples,
                });
            }
            _ => {}
        }
        pos += 8 + len + (len & 1);
    }
    None
}

/// Root mean square of the samples relative to full scale (0.0 = silence, 1.0 = full-scale square).
pub fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples
        .iter()
        .map(|s| {
            let x = *s as f64 / 32768.0;
            x * x
        })
        .sum();
    (sum / samples.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_audio_is_normalized_to_its_peak() {
        let pcm = float_to_i16(&[0.0, 0.25, -0.5, 0.5]);
        assert_eq!(pcm, [0, 16383, -32767, 32767]);
        // Near silence is not blown up to full scale.
        let quiet = float_to_i16(&[0.001, -0.001]);
        assert_eq!(quiet, [3276, -3276]);
    }

    #[test]
    fn wav_round_trips_through_the_parser() {
        let samples: Vec<i16> = (0..1000).map(|i| ((i * 37) % 2000 - 1000) as i16).collect();
        let bytes = wav_bytes(&samples, 22050);
        assert_eq!(bytes.len(), 44 + 2000);
        assert_eq!(&bytes[0..4], b"RIFF");
        let wav = parse_wav(&bytes).expect("valid wav");
        assert_eq!(wav.sample_rate, 22050);
        assert_eq!(wav.channels, 1);
        assert_eq!(wav.samples, samples);
        assert!((wav.duration_s() - 1000.0 / 22050.0).abs() < 1e-9);
    }

    #[test]
    fn resampling_changes_length_by_the_rate_ratio() {
        let samples: Vec<i16> = (0..22050).map(|i| (i % 100) as i16).collect();
        assert_eq!(resample(&samples, 22050, 16000).len(), 16000);
        assert_eq!(resample(&samples, 22050, 44100).len(), 44100);
        assert_eq!(resample(&samples, 22050, 22050), samples);
        // Interpolation between two samples.
        assert_eq!(resample(&[0, 100], 1, 2), [0, 50, 100, 100]);
    }

    #[test]
    fn rms_of_silence_is_zero_and_of_a_square_wave_is_its_level() {
        assert_eq!(rms(&[0; 100]), 0.0);
        let square: Vec<i16> = (0..100)
            .map(|i| if i % 2 == 0 { 16384 } else { -16384 })
            .collect();
        assert!((rms(&square) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn formats_parse_and_name_their_artifacts() {
        assert_eq!(Format::parse("wav"), Some(Format::Wav));
        assert_eq!(Format::parse("pcm_s16le"), Some(Format::PcmS16le));
        assert_eq!(Format::parse("mp3"), None);
        assert_eq!(Format::Wav.artifact_name(), "audio.wav");
        assert_eq!(
            Format::PcmS16le.content_type(16000),
            "audio/L16; rate=16000; channels=1"
        );
        assert_eq!(Format::PcmS16le.encode(&[1, -1], 8000), [1, 0, 255, 255]);
    }
}

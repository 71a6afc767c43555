import asyncio

import mlx.core as mx
import pytest

from reconciler.datapath.wire import (
    FLAG_SAMPLE,
    HEADER,
    ConnectionClosed,
    Frame,
    Kind,
    OpenRequest,
    StageAddress,
    Tensor,
    WireError,
    array_to_tensor,
    decode_frame,
    encode_frame,
    read_frame,
    tensor_to_array,
    write_frame,
)


def roundtrip(frame: Frame) -> Frame:
    head, data = encode_frame(frame)
    return decode_frame(head + bytes(data))


def test_a_forward_frame_keeps_every_header_field_and_its_tensor_bytes():
    tensor = Tensor("int32", (1, 3), bytes(range(12)))
    frame = Frame(Kind.FORWARD, (1 << 63) + 5, stage=2, flags=FLAG_SAMPLE, position=4096, tensor=tensor)
    decoded = roundtrip(frame)
    assert decoded == Frame(Kind.FORWARD, (1 << 63) + 5, stage=2, flags=FLAG_SAMPLE, position=4096, tensor=tensor)
    assert len(encode_frame(frame)[0]) == HEADER.size


def test_a_token_frame_carries_the_token_id_and_no_tensor():
    decoded = roundtrip(Frame(Kind.TOKEN, 9, stage=1, token=50_000))
    assert (decoded.kind, decoded.token, decoded.tensor, decoded.meta) == (Kind.TOKEN, 50_000, None, None)


def test_an_open_frame_carries_its_request_spec_as_json():
    spec = OpenRequest(shard="s0", next=StageAddress(host="127.0.0.1", port=5000, shard="s1"))
    decoded = roundtrip(Frame(Kind.OPEN, 1, meta=spec.model_dump(mode="json")))
    assert OpenRequest.model_validate(decoded.meta) == spec


def test_bf16_hidden_states_cross_the_wire_bit_for_bit():
    hidden = (mx.random.normal((1, 7, 2048)) * 100).astype(mx.bfloat16)
    tensor = array_to_tensor(hidden)
    assert len(tensor.data) == 7 * 2048 * 2
    back = tensor_to_array(roundtrip(Frame(Kind.FORWARD, 1, tensor=tensor)).tensor)
    assert back.dtype == mx.bfloat16 and back.shape == hidden.shape
    assert mx.array_equal(back.view(mx.uint16), hidden.view(mx.uint16)).item()


def test_a_strided_array_is_sent_in_its_logical_order():
    base = mx.arange(24, dtype=mx.float32).reshape(2, 3, 4)
    strided = base.transpose(0, 2, 1)
    assert mx.array_equal(tensor_to_array(array_to_tensor(strided)), strided).item()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: b"HT" + raw[2:], "bad magic"),
        (lambda raw: raw[:2] + bytes([99]) + raw[3:], "protocol version 99"),
        (lambda raw: raw[:3] + bytes([42]) + raw[4:], "unknown frame kind 42"),
        (lambda raw: raw[:-1], "header says"),
    ],
)
def test_malformed_frames_are_rejected_with_the_reason(mutate, message):
    head, data = encode_frame(Frame(Kind.FORWARD, 1, tensor=Tensor("float32", (2,), bytes(8))))
    with pytest.raises(WireError, match=message):
        decode_frame(mutate(head + data))


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused():
    with pytest.raises(WireError, match=r"needs 24 bytes, got 20"):
        Tensor("float32", (2, 3), bytes(20))
    with pytest.raises(WireError, match="dtype 'int8'"):
        Tensor("int8", (1,), bytes(1))


async def test_frames_written_to_a_stream_are_read_back_in_order_then_eof_is_reported():
    received: list[Frame] = []
    done = asyncio.Event()

    async def serve(reader, writer):
        try:
            while True:
                received.append(await read_frame(reader))
        except ConnectionClosed:
            done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    frames = [Frame(Kind.FORWARD, 7, position=i, tensor=Tensor("int32", (1, 1), i.to_bytes(4, "little"))) for i in range(5)]
    for frame in frames:
        write_frame(writer, frame)
    await writer.drain()
    writer.close()
    await asyncio.wait_for(done.wait(), 5)
    server.close()
    assert received == frames


def test_a_header_claiming_more_data_than_any_frame_may_carry_is_refused_before_its_body_is_read():
    from reconciler.datapath.wire import MAX_DATA_BYTES, decode_header

    head, _ = encode_frame(Frame(Kind.FORWARD, 1, tensor=Tensor("int32", (1,), bytes(4))))
    huge = head[: HEADER.size - 8] + (MAX_DATA_BYTES + 1).to_bytes(8, "big")
    with pytest.raises(WireError, match=f"at most {MAX_DATA_BYTES}"):
        decode_header(huge)


@pytest.mark.parametrize("meta", [b"[1]", b'"s3cret"', b'{"token": "wrong"}', b"\xff"])
async def test_a_hello_with_malformed_or_wrong_metadata_is_refused_with_a_wire_error(meta):
    from reconciler.datapath.wire import check_hello

    reader = asyncio.StreamReader()
    head, _ = encode_frame(Frame(Kind.HELLO, 0, meta={"x": 1}))
    reader.feed_data(head[: HEADER.size - 12] + len(meta).to_bytes(4, "big") + bytes(8) + meta)
    with pytest.raises(WireError):
        await check_hello(reader, token="s3cret", timeout_s=1)

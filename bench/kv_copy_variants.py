import torch, triton
from baton.kernels.kv_block_copy import _copy_spans_kernel, _as_words
blk=(32,2,16,8,128); n=320; nb=480
src=torch.randn((nb,*blk),device="cuda",dtype=torch.bfloat16); dst=torch.empty_like(src)
g=torch.Generator().manual_seed(0)
s=torch.randperm(nb,generator=g)[:n].int().cuda(); d=torch.randperm(nb,generator=g)[:n].int().cuda()
S,D=_as_words(src),_as_words(dst); bw=S.shape[1]
nbytes=n*src[0].numel()*2
fs,fd=src.view(-1).view(torch.uint8),dst.view(-1).view(torch.uint8)
bulk=triton.testing.do_bench(lambda: fd[:nbytes].copy_(fs[:nbytes]),return_mode="median")
print(f"bulk {bulk*1e3:.0f} us")
for words in (2048,4096,8192,16384):
  for w in (4,8,16):
    f=lambda: _copy_spans_kernel[(n,triton.cdiv(bw,words))](S,D,s,d,bw,0,bw,BLOCK=words,num_warps=w)
    t=triton.testing.do_bench(f,return_mode="median")
    print(f"BLOCK={words} warps={w}: {t*1e3:.0f} us  {t/bulk:.2f}x")
S64,D64=src.view(nb,-1).view(torch.int64),dst.view(nb,-1).view(torch.int64); bw64=S64.shape[1]
for words in (2048,4096):
  for w in (4,8):
    f=lambda: _copy_spans_kernel[(n,triton.cdiv(bw64,words))](S64,D64,s,d,bw64,0,bw64,BLOCK=words,num_warps=w)
    t=triton.testing.do_bench(f,return_mode="median"); print(f"int64 BLOCK={words} warps={w}: {t*1e3:.0f} us {t/bulk:.2f}x")

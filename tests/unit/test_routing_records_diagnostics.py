"""The routing diagnostics on compact records (densified a chunk of rows at a time) give exactly the numbers of
the dense layout: integer counts, dyadic overlap sums, the variance attribution."""

import torch



def test_packed_statistics_equal_the_dense_ones_exactly():
    from sapo_megatron.routing_layout import RoutingRecord
    from sapo_megatron.diagnostics import routing_stats as R
    from sapo_megatron.diagnostics.attribution import routing_variance_stats
    g=torch.Generator().manual_seed(0)
    B,S,L,k,E=12,40,5,4,16
    def rand_routing():
        return torch.rand(B,S,L,E,generator=g).topk(k,dim=-1).indices
    a=rand_routing(); b=a.clone()
    flip=torch.rand(B,S,L,generator=g)<0.3
    b[flip]=rand_routing()[flip]
    mask=torch.rand(B,S,generator=g)>0.4
    pos=mask.clone(); pos[0,:]=False  # row 0 not recorded at all
    ra=RoutingRecord.from_dense(a,pos,E); rb=RoutingRecord.from_dense(b,pos,E)
    da=ra.dense(S); db=rb.dense(S)
    for fn in (R.routing_change_stats,):
        p=fn(ra,rb,mask); d=fn(da,db,mask)
        for key in d: assert torch.equal(p[key],d[key]), (key,p[key],d[key])
    assert torch.equal(R.changed_layer_count(ra,rb,mask), R.changed_layer_count(da,db,mask))
    assert torch.equal(R.expert_load_stats(ra,mask,E)["expert_counts"], R.expert_load_stats(da,mask,E)["expert_counts"])
    vals=torch.randn(B,S,generator=g,dtype=torch.float64)
    vals=torch.where(mask,vals,0.0)
    p=routing_variance_stats(vals,mask,ra,rb); d=routing_variance_stats(vals,mask,da,db)
    for key in d: assert torch.allclose(p[key],d[key],rtol=0,atol=1e-12) and torch.equal(p[key],d[key]), key
